"""BLIP image captioning on transformers' BLIP, decoding exactly as the original BLIP code did.

Usage: `load_captioner("model_base_capfilt_large.pth")` (or a URL, a transformers directory, a hub id)
returns a `BlipCaptioner`; `.caption([image, ...])` gives one caption per PIL image.
"""

from captioner.blip import BlipCaptioner
from captioner.loading import load_captioner
from captioner.settings import CaptionSettings
from ldm.checkpoint import CheckpointError

__all__ = ["BlipCaptioner", "CaptionSettings", "CheckpointError", "load_captioner"]
