"""Low-level helpers shared by the dataset build, the captioner and the trainer: downloads
(`common.download`), atomic file writes (`common.files`), disk space (`common.disk`) and argument types
(`common.cli`). Imports nothing of the project and nothing heavy (no torch)."""
