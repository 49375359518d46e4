"""Work-arounds for interactions between libraries (torch is imported only when a function runs)."""

from __future__ import annotations


def settle_device_constructors() -> None:
    """Make torch record its list of device-aware factory functions now, before transformers loads a model.

    `with torch.device(...)` looks its factory functions up in a list torch builds once, at its first use.
    transformers' from_pretrained replaces torch.linspace while it builds a model under such a context; if
    that is the first use in the process, torch keeps the replacement in its list for good, and from then on
    torch.linspace ignores `with torch.device("meta")` (our meta-device shape checks then mix meta and CPU
    tensors). Calling this before from_pretrained keeps the real functions in the list.
    """
    import torch

    with torch.device("cpu"):
        torch.empty(0)
