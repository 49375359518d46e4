"""Exporting a trained ControlNet for use elsewhere: A1111 / ComfyUI, diffusers, the original code.

The source is a training checkpoint (training.py's last.ckpt / step-N.ckpt: the ControlLDM state dict in
the original layout plus `hyper_parameters`, which carry the model config) or a full ControlLDM file such
as tool_add_control.py's output (built with a config, default models/cldm_v15.yaml). Three formats:

- "control": the `control_model.*` tensors alone (340 for SD 1.x/2.x), original layout, as one
  .safetensors whose metadata holds the model config and the run's facts. This is the file that
  sd-webui-controlnet (A1111) and ComfyUI load from their ControlNet folders. A run that also trained the
  SD decoder (sd_locked False) needs its own SD weights too: they are written beside it (NAME-sd.EXT).
- "diffusers": a `ControlNetModel` folder (config.json + diffusion_pytorch_model.safetensors), plus
  `unet/` (a `UNet2DConditionModel` folder) when the decoder was trained; see cldm/diffusers_format.py.
- "original": every tensor of the ControlLDM (the original's cldm_v15/v21 state-dict layout), weights
  only, as .safetensors or as a .ckpt/.pth holding a plain {key: tensor} dict, which the original's
  `model.load_state_dict(load_state_dict(path))` loads strictly. Its text encoder's `position_ids`
  buffer, which transformers <= 4.30 keep in the state dict, can be added (`clip_position_ids`).

Every tensor is read from the source when it is written (`.safetensors` output streams: memory stays one
tensor; `.ckpt` needs all of them at once for torch.save). Outputs are written under a temporary name and
renamed, and an output that exists is never replaced, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cldm import diffusers_format
from cldm.inference_loading import (
    CONTROL_ONLY_KIND,
    DEFAULT_CONFIG,
    TRAINING_KIND,
    carried_model_config,
    checkpoint_kind,
)
from cldm.model import load_config
from ldm.checkpoint import CONTROL_PREFIX, UNET_PREFIX, CheckpointError, load_weights
from ldm.lazy_checkpoint import TORCH_SUFFIXES, LazyCheckpoint, TensorSpec, open_lazy, write_safetensors
from ldm.util import instantiate_from_config

FORMATS = ("control", "diffusers", "original")
DEFAULT_FORMAT = "control"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# fp16 for the control file as the released ControlNets ship (half the size, what A1111/ComfyUI run in);
# fp32 where the file is meant for further work (diffusers, the original code's training).
DEFAULT_DTYPES = {"control": "fp16", "diffusers": "fp32", "original": "fp32"}
SD_COMPANION_SUFFIX = "-sd"
CLIP_EMBEDDINGS = "cond_stage_model.transformer.text_model.embeddings."
CLIP_POSITION_IDS = CLIP_EMBEDDINGS + "position_ids"
CLIP_POSITION_EMBEDDING = CLIP_EMBEDDINGS + "position_embedding.weight"
# Lightning files of a module that kept the ControlLDM under `model` hold its keys with this prefix.
LIGHTNING_MODEL_PREFIX = "model."
PARTIAL_SUFFIX = ".partial"


@dataclass
class ExportSource:
    """A checkpoint checked against its model: what it holds and how to read it, tensor by tensor.

    expected: {ControlLDM key: TensorSpec} of the model (meta build); facts: the run's hyper_parameters
    (empty for a file without them) and global_step.
    """

    path: Path
    checkpoint: LazyCheckpoint
    model_config: dict[str, Any]
    expected: dict[str, TensorSpec]
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    global_step: int | None = None
    prefix: str = ""

    @property
    def sd_locked(self) -> bool:
        """False when the run also trained the SD decoder (its UNet differs from the base's)."""
        return bool(self.hyper_parameters.get("sd_locked", True))

    def tensor(self, key: str) -> torch.Tensor:
        """The model tensor `key` as stored; a `logvar` the file lacks is the model's zeros."""
        if self.prefix + key in self.checkpoint:
            return self.checkpoint[self.prefix + key]
        return torch.zeros(self.expected[key].shape, dtype=self.expected[key].dtype)

    def facts(self) -> dict[str, str]:
        """The run's facts as safetensors metadata strings (None values left out)."""
        hp = self.hyper_parameters
        facts = {"format": "pt", "source": self.path.name, "model_config": json.dumps(self.model_config),
                 "base": hp.get("init"), "data": hp.get("data"), "resolution": hp.get("resolution"),
                 "steps": self.global_step, "sd_locked": self.sd_locked,
                 "hint_channels": self.model_config["params"]["control_stage_config"]["params"]["hint_channels"],
                 # The control type (annotator.controls); a run from before the records trained on Canny.
                 "condition": (hp.get("control") or {}).get("name", "canny") if hp else None,
                 "control": hp.get("control")}
        if hp:
            facts["hyper_parameters"] = json.dumps(hp, default=str)
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in facts.items()
                if value is not None}


def inspect_source(checkpoint: LazyCheckpoint, config_path: str | os.PathLike | None = None) -> ExportSource:
    """Check that `checkpoint` is a training checkpoint or full ControlLDM file that fits its config.

    config_path: for a file without hyper_parameters (default models/cldm_v15.yaml); a training checkpoint
    carries its own. Raises CheckpointError naming the file and the problem.
    """
    path = Path(checkpoint.path)
    prefix = LIGHTNING_MODEL_PREFIX if any(k.startswith(LIGHTNING_MODEL_PREFIX + CONTROL_PREFIX)
                                           for k in checkpoint.specs) else ""
    kind = checkpoint_kind(checkpoint)
    if kind == CONTROL_ONLY_KIND:
        raise CheckpointError(f"{path}: holds only a ControlNet; export reads a training checkpoint "
                              f"(training.py's last.ckpt / step-N.ckpt) or a full ControlLDM checkpoint")
    if kind == TRAINING_KIND:
        model_config = carried_model_config(checkpoint.metadata)
        hyper_parameters = dict(checkpoint.metadata.get("hyper_parameters") or {})
    else:
        model_config = load_config(config_path or DEFAULT_CONFIG)["model"]
        hyper_parameters = {}
    with torch.device("meta"):
        model = instantiate_from_config(model_config)
    expected = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    given = {k[len(prefix):]: torch.empty(s.shape, dtype=s.dtype, device="meta")
             for k, s in checkpoint.specs.items() if k.startswith(prefix)}
    load_weights(model, given, source=str(path))  # the strict, explained check (keys and shapes)
    if not any(k.startswith(CONTROL_PREFIX) for k in expected):
        raise CheckpointError(f"{path}: its config builds no ControlNet (no control_model.* in the model)")
    step = checkpoint.metadata.get("global_step")
    return ExportSource(path, checkpoint, model_config, expected, hyper_parameters,
                        step if isinstance(step, int) else None, prefix)


@contextmanager
def open_source(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Iterator[ExportSource]:
    """`inspect_source` of the file at `path`, closed on exit."""
    with open_lazy(path) as checkpoint:
        yield inspect_source(checkpoint, config_path)


# ---- what each file holds ---------------------------------------------------------------------------
@dataclass
class FilePlan:
    """One output file: {output key: TensorSpec} and where each tensor comes from."""

    specs: dict[str, TensorSpec]
    read: Callable[[str], torch.Tensor]


def _cast(spec: TensorSpec, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(spec.shape, dtype if spec.dtype.is_floating_point else spec.dtype)


def _renamed(source: ExportSource, names: Mapping[str, str], dtype: torch.dtype,
             extra: Mapping[str, torch.Tensor] | None = None) -> FilePlan:
    """The model tensors `names` ({model key: output key}) cast to `dtype`, plus `extra` tensors as given."""
    specs = {out: _cast(source.expected[key], dtype) for key, out in names.items()}
    origin = {out: key for key, out in names.items()}
    extra = dict(extra or {})
    specs.update({key: TensorSpec(tuple(t.shape), t.dtype) for key, t in extra.items()})

    def read(out: str) -> torch.Tensor:
        if out in extra:
            return extra[out]
        return source.tensor(origin[out]).to(specs[out].dtype)

    return FilePlan(specs, read)


def control_plan(source: ExportSource, dtype: torch.dtype) -> FilePlan:
    """The control-only file: every control_model.* tensor, keys as in the original."""
    return _renamed(source, {k: k for k in source.expected if k.startswith(CONTROL_PREFIX)}, dtype)


def sd_plan(source: ExportSource, dtype: torch.dtype) -> FilePlan:
    """The SD checkpoint of the run (everything but the ControlNet): with a trained decoder, the SD that
    the ControlNet goes with."""
    return _renamed(source, {k: k for k in source.expected if not k.startswith(CONTROL_PREFIX)}, dtype)


def original_plan(source: ExportSource, dtype: torch.dtype, clip_position_ids: bool = False) -> FilePlan:
    """Every ControlLDM tensor in the original layout; with clip_position_ids also CLIP's position_ids
    (int64 [1, positions]) that transformers <= 4.30 expect in the state dict (SD 1.x text encoder only)."""
    extra = {}
    if clip_position_ids:
        if CLIP_POSITION_EMBEDDING not in source.expected:
            raise CheckpointError(f"{source.path}: the model has no transformers CLIP text encoder "
                                  f"({CLIP_POSITION_EMBEDDING}), so there are no position_ids to add")
        positions = source.expected[CLIP_POSITION_EMBEDDING].shape[0]
        extra[CLIP_POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    return _renamed(source, {k: k for k in source.expected}, dtype, extra)


def _submodule_names(source: ExportSource, prefix: str, layers_per_block: int) -> dict[str, str]:
    keys = [k[len(prefix):] for k in source.expected if k.startswith(prefix)]
    return {prefix + key: name for key, name in diffusers_format.diffusers_names(keys, layers_per_block).items()}


def diffusers_controlnet_plan(source: ExportSource, dtype: torch.dtype) -> tuple[FilePlan, dict[str, Any]]:
    """(weights, config.json) of the ControlNetModel folder."""
    params = source.model_config["params"]["control_stage_config"]["params"]
    config = diffusers_format.controlnet_config(
        params, source.model_config["params"].get("global_average_pooling", False))
    return _renamed(source, _submodule_names(source, CONTROL_PREFIX, params["num_res_blocks"]), dtype), config


def diffusers_unet_plan(source: ExportSource, dtype: torch.dtype) -> tuple[FilePlan, dict[str, Any]]:
    """(weights, config.json) of the UNet2DConditionModel folder (the run's SD UNet)."""
    model_params = source.model_config["params"]
    params = model_params["unet_config"]["params"]
    config = diffusers_format.unet_config(params, model_params.get("image_size", params.get("image_size")))
    return _renamed(source, _submodule_names(source, UNET_PREFIX, params["num_res_blocks"]), dtype), config


# ---- writing ----------------------------------------------------------------------------------------
def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _write_plan(plan: FilePlan, final: Path, metadata: Mapping[str, str] | None = None,
                progress: bool = False) -> Path:
    """Write `plan` for `final` under its partial name (a `final.suffix` of .safetensors is streamed;
    .ckpt/.pth/.pt a torch.save'd plain dict); returns the partial path."""
    path = _partial(final)
    if final.suffix == ".safetensors":
        write_safetensors(path, plan.specs, plan.read, metadata, progress=progress, desc=f"writing {final.name}")
    else:
        # Each tensor owns its storage (a view of the source's mmap would drag the whole storage along).
        torch.save({key: plan.read(key).clone() for key in sorted(plan.specs)}, path)
    return path


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            what = "a folder" if path.is_dir() else "a file"
            raise FileExistsError(f"{path} already exists ({what}); refusing to overwrite it")


def _publish(partials: Mapping[Path, Path]) -> None:
    """Rename each written partial to its final name, refusing a name that appeared meanwhile."""
    _refuse_existing(*partials.values())
    for partial, final in partials.items():
        os.replace(partial, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def companion_sd_path(output: Path) -> Path:
    """Where the control export of a run with a trained decoder puts its SD checkpoint: NAME-sd.EXT."""
    return output.with_name(output.stem + SD_COMPANION_SUFFIX + output.suffix)


def check_output(output: str | os.PathLike, fmt: str) -> Path:
    """The output path, or ValueError/FileExistsError for one this format cannot write."""
    output = Path(output)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "control" and output.suffix != ".safetensors":
        raise ValueError(f"{output}: the control export is a .safetensors file (name it *.safetensors)")
    if fmt == "original" and output.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"{output}: the original export is .safetensors or .ckpt/.pth/.pt")
    _refuse_existing(output)
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{output}: {parent} is a file, not a folder")
            break
    return output


def export(source: ExportSource, output: str | os.PathLike, fmt: str = DEFAULT_FORMAT,
           dtype: torch.dtype | None = None, clip_position_ids: bool = False, progress: bool = False) -> list[str]:
    """Write `source` in format `fmt` ("control", "diffusers", "original") to `output`; returns report lines.

    dtype: of the floating tensors (default DEFAULT_DTYPES[fmt]). Nothing is written under a final name
    until every file is complete; on any error the partial files are removed.
    """
    output = check_output(output, fmt)
    dtype = dtype or DTYPES[DEFAULT_DTYPES[fmt]]
    if clip_position_ids and fmt != "original":
        raise ValueError("clip_position_ids applies to the original export only")
    output.parent.mkdir(parents=True, exist_ok=True)
    written: dict[Path, Path] = {}
    try:
        if fmt == "control":
            lines = _export_control(source, output, dtype, written, progress)
        elif fmt == "original":
            plan = original_plan(source, dtype, clip_position_ids)
            written[_partial(output)] = output
            _write_plan(plan, output, {"format": "pt"}, progress)
            lines = [f"wrote {output}: {len(plan.specs)} tensors, the full ControlLDM in the original layout"]
        else:
            lines = _export_diffusers(source, output, dtype, written, progress)
        _publish(written)
    finally:
        for partial in written:
            _remove(partial)
    return lines


def _export_control(source: ExportSource, output: Path, dtype: torch.dtype, written: dict[Path, Path],
                    progress: bool) -> list[str]:
    plan = control_plan(source, dtype)
    facts = source.facts()
    lines = []
    if not source.sd_locked:
        sd_path = companion_sd_path(output)
        _refuse_existing(sd_path)
        written[_partial(sd_path)] = sd_path
        _write_plan(sd_plan(source, dtype), sd_path, {**facts, "content": "sd"}, progress)
        facts["sd_checkpoint"] = sd_path.name
    written[_partial(output)] = output
    _write_plan(plan, output, {**facts, "content": "control"}, progress)
    lines.append(f"wrote {output}: {len(plan.specs)} control_model.* tensors ({str(dtype).removeprefix('torch.')})")
    if not source.sd_locked:
        lines.append(f"wrote {sd_path}: the Stable Diffusion checkpoint with the decoder this run trained "
                     f"(sd_locked False). The two go together: use {output.name} with {sd_path.name} as the "
                     f"base model, not with the original SD checkpoint")
    return lines


def _export_diffusers(source: ExportSource, output: Path, dtype: torch.dtype, written: dict[Path, Path],
                      progress: bool) -> list[str]:
    folder = _partial(output)
    _remove(folder)
    written[folder] = output
    folder.mkdir()
    plan, config = diffusers_controlnet_plan(source, dtype)
    _write_folder(folder, plan, config, progress)
    lines = [f"wrote {output}: a diffusers ControlNetModel ({len(plan.specs)} tensors, "
             f"{str(dtype).removeprefix('torch.')})"]
    if not source.sd_locked:
        unet_plan, unet_config = diffusers_unet_plan(source, dtype)
        (folder / diffusers_format.UNET_FOLDER).mkdir()
        _write_folder(folder / diffusers_format.UNET_FOLDER, unet_plan, unet_config, progress)
        lines.append(f"wrote {output / diffusers_format.UNET_FOLDER}: the UNet2DConditionModel with the decoder "
                     f"this run trained (sd_locked False); the ControlNet goes with this UNet, not the base one")
    return lines


def _write_folder(folder: Path, plan: FilePlan, config: Mapping[str, Any], progress: bool) -> None:
    (folder / diffusers_format.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_safetensors(folder / diffusers_format.WEIGHTS_NAME, plan.specs, plan.read, {"format": "pt"},
                      progress=progress, desc=f"writing {folder.name}/{diffusers_format.WEIGHTS_NAME}")
