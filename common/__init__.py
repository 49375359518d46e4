"""Low-level helpers shared by the dataset build and the captioner: downloads (`common.download`) and
atomic file writes (`common.files`). Imports nothing of the project and nothing heavy (no torch)."""
