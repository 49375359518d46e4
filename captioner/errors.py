"""The one error type the captioner raises for a checkpoint or model it cannot use."""


class CheckpointError(ValueError):
    """A caption model that cannot be loaded: unreadable file, unknown or missing keys, bad shapes or config.

    The message names the file (or URL / directory) and the offending key or value."""
