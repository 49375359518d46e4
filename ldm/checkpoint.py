"""Loading SD / ControlNet checkpoints with a strict, explained key check.

Reading is `ldm.lazy_checkpoint`, the one reader (re-exported here: `read_checkpoint`, `read_state_dict`,
`CheckpointError`); it never unpickles code. Loading accepts the known harmless differences between
released files
and a freshly built model, reports them, and refuses everything else with the offending keys and the
most likely cause.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.lazy_checkpoint import CheckpointError, StateDict, read_checkpoint, read_state_dict, unwrap_state_dict

__all__ = ["CONTROL_PREFIX", "EMA_PREFIX", "UNET_PREFIX", "CheckpointError", "LoadReport", "StateDict",
           "load_weights", "read_checkpoint", "read_state_dict", "unwrap_state_dict"]

EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
# Files written with transformers < 4.31 store CLIP's position_ids buffer; newer versions do not.
POSITION_IDS_SUFFIX = "embeddings.position_ids"
# Keys a released checkpoint may lack that a fresh model may fill: SD 1.x/2.x files written by the
# CompVis code have no logvar (a plain tensor there, zeros).
FILLABLE_KEYS = frozenset({"logvar"})


@dataclass
class LoadReport:
    """What loading did beyond copying matching tensors."""

    loaded: int = 0
    ignored_position_ids: list[str] = field(default_factory=list)
    ignored_ema: int = 0
    used_ema: int = 0
    filled_from_model: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"loaded {self.loaded} tensors"]
        if self.used_ema:
            out.append(f"used the EMA weights for {self.used_ema} UNet tensors (model_ema.*)")
        if self.ignored_ema:
            out.append(f"ignored {self.ignored_ema} EMA entries (model_ema.*); the non-EMA weights were used")
        if self.ignored_position_ids:
            out.append(f"ignored {', '.join(self.ignored_position_ids)} (a buffer newer transformers rebuild)")
        if self.filled_from_model:
            out.append(f"kept the fresh model's values for missing {', '.join(self.filled_from_model)}")
        return out

    def __str__(self) -> str:
        return "; ".join(self.lines())


def _ema_name(key: str) -> str:
    """The LitEma name of a UNet parameter: 'model.diffusion_model.a.b' -> 'model_ema.diffusion_modelab'."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _diagnose(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor],
              missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """Likely causes of a mismatch, in words."""
    hints = []
    has = lambda keys, prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(given, "cond_stage_model.model.") and has(expected, "cond_stage_model.transformer."):
        hints.append("the file has an OpenCLIP text encoder (SD 2.x) but the config builds CLIP ViT-L (SD 1.x): "
                     "use models/cldm_v21.yaml")
    if has(given, "cond_stage_model.transformer.") and has(expected, "cond_stage_model.model."):
        hints.append("the file has a CLIP ViT-L text encoder (SD 1.x) but the config builds OpenCLIP (SD 2.x): "
                     "use models/cldm_v15.yaml")
    if any(".attn2.to_k." in k for k in mismatched):
        hints.append("cross-attention widths differ (768 for SD 1.x, 1024 for SD 2.x): the config and the "
                     "checkpoint are of different SD versions")
    if any(".proj_in." in k or ".proj_out." in k for k in mismatched):
        hints.append("the transformer projections differ in kind (1x1 conv in SD 1.x, linear in SD 2.x): "
                     "check use_linear_in_transformer / the SD version of the config")
    if missing and all(k.startswith(CONTROL_PREFIX) for k in missing):
        hints.append("the file is a plain Stable Diffusion checkpoint without a ControlNet: run "
                     "tool_add_control.py on it first (or load a ControlNet on top of it)")
    if unexpected and all(k.startswith(CONTROL_PREFIX) for k in unexpected):
        hints.append("the file holds a ControlNet but the config builds plain SD: use a cldm_*.yaml config")
    if has(given, "down_blocks.") or has(given, "controlnet_down_blocks."):
        hints.append("this looks like a diffusers-format file; this tool reads the original (CompVis) layout")
    if given and not missing and not mismatched and len(unexpected) == len(given):
        hints.append("none of the file's keys belong to this model")
    return hints


def _format_keys(title: str, keys: list[str], describe, limit: int = 20) -> str:
    shown = "\n".join(f"    {k}{describe(k)}" for k in keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n{shown}{more}"


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, prefer_ema: bool = False,
                 allow_missing: tuple[str, ...] = (), source: str = "checkpoint") -> LoadReport:
    """Copy `state_dict` into `model` with a strict key and shape check.

    Accepted differences (reported): CLIP `...embeddings.position_ids`; `model_ema.*` (ignored, or used
    for the UNet when prefer_ema); a missing `logvar`; missing keys under one of `allow_missing`
    prefixes (e.g. "control_model." when only SD weights are wanted). Anything else raises
    CheckpointError listing the keys and shapes and the likely cause.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    report = LoadReport()
    given: StateDict = {}
    ema = {k: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    for key, value in state_dict.items():
        if key.startswith(EMA_PREFIX):
            continue
        if key.endswith(POSITION_IDS_SUFFIX) and key not in expected:
            report.ignored_position_ids.append(key)
            continue
        given[key] = value
    if prefer_ema and ema:
        for key in expected:
            if key.startswith(UNET_PREFIX) and _ema_name(key) in ema:
                given[key] = ema[_ema_name(key)]
                report.used_ema += 1
    else:
        report.ignored_ema = sum(1 for k in ema if k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"))

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in given if k in expected and tuple(given[k].shape) != tuple(expected[k])]
    report.filled_from_model = [k for k in missing if k in FILLABLE_KEYS or k.startswith(allow_missing)]
    missing = [k for k in missing if k not in report.filled_from_model]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit the model:"]
        if mismatched:
            parts.append(_format_keys(
                "shape mismatches", mismatched,
                lambda k: f": file {list(given[k].shape)}, model {list(expected[k])}"))
        if missing:
            parts.append(_format_keys("missing from the file", missing, lambda k: f" {list(expected[k])}"))
        if unexpected:
            parts.append(_format_keys("not in the model", unexpected, lambda k: f" {list(given[k].shape)}"))
        hints = _diagnose(expected, given, missing, unexpected, mismatched)
        if hints:
            parts.append("Likely cause: " + "; ".join(hints))
        raise CheckpointError("\n".join(parts))
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(given, strict=False, assign=on_meta)
    report.loaded = len(given)
    return report
