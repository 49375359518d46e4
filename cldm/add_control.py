"""Grafting a ControlNet onto a Stable Diffusion checkpoint: the initial weights for training.

The ControlNet is a trainable copy of the SD UNet encoder, so each `control_model.X` starts as
`model.diffusion_model.X`; what has no counterpart in SD (the hint block, the zero convs and
`middle_block_out`) starts fresh, as the constructor initialises it (zero convs all zero). Every other
key is copied as is. This is the original `tool_add_control.py` rule: for a key `control_<rest>` the
source is `model.diffusion_<rest>`, any other key is its own source, and a key whose source the input
lacks keeps its fresh value and is reported as new.

Memory: the full model is only built on the meta device (for the expected keys and shapes). The fresh
values come from a model without the locked parts (UNet, VAE, text encoder): the ControlNet and the
top-level buffers (1.4 GB for SD 1.5), of which only the new tensors are kept before the input is read.
The input is read one tensor at a time and `.safetensors` output is streamed, so the peak stays far
below input plus output (see bench/tool_add_control_memory.py; `.ckpt` output needs every tensor at once
for torch.save).

dtype: copied tensors keep the input's dtype (an fp16 SD file gives an fp16 initial ControlNet, whose
values are exactly the UNet's); new tensors take the input's most common floating dtype. The original
wrote fp32 throughout (it loaded into an fp32 model); `dtype=torch.float32` does the same. Training
loads either into its fp32 model, so both give the same start.
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cldm.model import load_config
from ldm.checkpoint import CONTROL_PREFIX, EMA_PREFIX, CheckpointError, load_weights
from ldm.lazy_checkpoint import TORCH_SUFFIXES, LazyCheckpoint, TensorSpec, open_lazy, write_safetensors
from ldm.util import instantiate_from_config

# The original's renaming rule: control_<rest> is copied from model.diffusion_<rest>.
CONTROL_NAME_PREFIX = "control_"
UNET_NAME_PREFIX = "model.diffusion_"
# Sub-configs of the locked parts, whose weights always come from the SD checkpoint.
LOCKED_CONFIGS = ("unet_config", "first_stage_config", "cond_stage_config")
PLACEHOLDER_CONFIG = {"target": "torch.nn.Identity"}
DEFAULT_SEED = 0  # the seed the reference data was made with


@dataclass
class AddControlPlan:
    """Where each output tensor comes from.

    sources: {output key: input key}, for the copied tensors. new: output keys that take fresh values.
    specs: {output key: TensorSpec} of the output. unused: input keys that are not written (EMA weights,
    CLIP's legacy position_ids).
    """

    sources: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Human-readable lines: what was copied, what is new, what was left out."""
        copied_control = sum(1 for k in self.sources if k.startswith(CONTROL_PREFIX))
        lines = [f"copied {len(self.sources) - copied_control} tensors as they are and {copied_control} "
                 f"control_model.* tensors from model.diffusion_model.*",
                 f"newly added ({len(self.new)}):"]
        lines += [f"  {key} {list(self.specs[key].shape)}" for key in self.new]
        if self.unused:
            ema = sum(1 for k in self.unused if k.startswith(EMA_PREFIX))
            other = [k for k in self.unused if not k.startswith(EMA_PREFIX)]
            lines.append(f"left out {len(self.unused)} input entries not in the model"
                         + (f": {ema} EMA weights (model_ema.*)" if ema else "")
                         + (f"{'; ' if ema else ': '}{', '.join(other)}" if other else ""))
        return lines


def source_key(key: str) -> str:
    """The input key a fresh model's key is copied from (the original's rule)."""
    if key.startswith(CONTROL_NAME_PREFIX):
        return UNET_NAME_PREFIX + key[len(CONTROL_NAME_PREFIX):]
    return key


def plan_add_control(model_config: Mapping, checkpoint: LazyCheckpoint,
                     dtype: torch.dtype | None = None) -> AddControlPlan:
    """Match the checkpoint against the config and decide the source of every output tensor.

    Raises CheckpointError (keys, shapes, likely cause) when the checkpoint does not fit the config or
    already holds a ControlNet.
    """
    given = checkpoint.specs
    source_name = str(checkpoint.path)
    present = sorted(k for k in given if k.startswith(CONTROL_PREFIX))
    if present:
        raise CheckpointError(f"{source_name} already holds a ControlNet ({len(present)} control_model.* "
                              f"tensors, e.g. {present[0]}); give a plain Stable Diffusion checkpoint")
    with torch.device("meta"):
        meta_model = instantiate_from_config(model_config)
    expected = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in meta_model.state_dict().items()}
    # The strict check with its diagnosis: control weights may be missing (they are what we add), and so
    # may the top-level buffers (the schedule, logvar), which the config determines.
    buffers = tuple(k for k in expected if "." not in k)
    meta_given = {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in given.items()}
    load_weights(meta_model, meta_given, allow_missing=(CONTROL_PREFIX, *buffers), source=source_name)
    del meta_model, meta_given

    plan = AddControlPlan()
    mismatched = []
    for key, spec in expected.items():
        source = source_key(key)
        if source in given:
            if given[source].shape != spec.shape:
                mismatched.append(f"{key} {list(spec.shape)} <- {source} {list(given[source].shape)}")
                continue
            plan.sources[key] = source
            plan.specs[key] = given[source] if dtype is None else TensorSpec(spec.shape, dtype)
        else:
            plan.new.append(key)
    if mismatched:
        raise CheckpointError(f"{source_name}: the ControlNet of the config does not have the shapes of the "
                              f"UNet encoder it copies:\n  " + "\n  ".join(mismatched))
    new_dtype = dtype or _most_common_float_dtype(given[s] for s in plan.sources.values())
    for key in plan.new:
        plan.specs[key] = TensorSpec(expected[key].shape, new_dtype if expected[key].dtype.is_floating_point
                                     else expected[key].dtype)
    used = set(plan.sources.values())
    plan.unused = sorted(k for k in given if k not in used)
    return plan


def _most_common_float_dtype(specs) -> torch.dtype:
    counts = Counter(s.dtype for s in specs if s.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32


def fresh_new_tensors(model_config: Mapping, keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Fresh values of `keys`, initialised by the model's own constructors after `torch.manual_seed(seed)`.

    Only the parts that can hold new keys are built (the ControlNet and the top-level buffers); the locked
    UNet, VAE and text encoder are left out, and everything but `keys` is dropped before returning.
    """
    params = dict(model_config.get("params", {}))
    for name in LOCKED_CONFIGS:
        params[name] = PLACEHOLDER_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        partial = instantiate_from_config({**model_config, "params": params})
    state = partial.state_dict()
    fresh = {k: state[k].clone() for k in keys}
    del partial, state
    gc.collect()
    return fresh


def add_control(input_path: str | os.PathLike, output_path: str | os.PathLike,
                config_path: str | os.PathLike, *, seed: int = DEFAULT_SEED, dtype: torch.dtype | None = None,
                progress: bool = True) -> AddControlPlan:
    """Write the initial ControlNet checkpoint for an SD checkpoint; returns the plan (what is new).

    input_path: SD checkpoint (`.safetensors`, `.ckpt`, `.pth`). output_path: `.safetensors`, or
    `.ckpt`/`.pth`/`.pt` (saved as {"state_dict": ...}); it must not exist. dtype: cast every tensor to
    it (None keeps the input's dtypes, see the module docstring).
    """
    output_path = Path(output_path)
    if output_path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"{output_path}: unknown output format; use .safetensors, .ckpt, .pth or .pt")
    if output_path.exists():
        raise FileExistsError(f"{output_path} already exists; refusing to overwrite it")
    model_config = load_config(config_path)["model"]
    with open_lazy(input_path) as checkpoint:
        plan = plan_add_control(model_config, checkpoint, dtype)
        fresh = fresh_new_tensors(model_config, plan.new, seed)

        def get_tensor(key: str, copy: bool = False) -> torch.Tensor:
            value = checkpoint[plan.sources[key]] if key in plan.sources else fresh[key]
            return value.to(plan.specs[key].dtype, copy=copy)

        output_path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = output_path.with_name(output_path.name + ".partial")
        try:
            if output_path.suffix == ".safetensors":
                metadata = {"format": "pt", "source": Path(input_path).name, "config": str(config_path),
                            "seed": str(seed)}
                write_safetensors(partial_path, plan.specs, get_tensor, metadata, progress=progress,
                                  desc=f"writing {output_path.name}")
            else:
                # torch.save needs every tensor at once. A control copy must own its storage (one that
                # shared the UNet's would be saved once and alias it after loading), hence copy=True.
                state_dict = {k: get_tensor(k, copy=k.startswith(CONTROL_PREFIX)) for k in sorted(plan.specs)}
                torch.save({"state_dict": state_dict}, partial_path)
                del state_dict
            if output_path.exists():
                raise FileExistsError(f"{output_path} appeared while writing; refusing to overwrite it")
            os.replace(partial_path, output_path)
        finally:
            partial_path.unlink(missing_ok=True)
    return plan

