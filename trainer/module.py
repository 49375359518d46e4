"""The ControlNet training system (Zhang et al. 2023, section 3.3) as a Lightning module.

The networks stay plain `nn.Module`s (`cldm.cldm.ControlLDM`); this module only decides what trains,
turns a batch into the loss and says how to save. Checkpoint contract (read by inference.py):

- `state_dict()` is exactly the ControlLDM state dict in the original layout (`control_model.*`,
  `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, schedule buffers), no prefix;
- `hyper_parameters` holds `model_config` (the config's `model` section as plain dicts, with the chosen
  attention / gradient checkpointing / only_mid_control applied) and the training options, all plain
  Python values, so the file loads with `torch.load(weights_only=True)` and rebuilds the model alone.

Randomness (noise, timesteps, VAE posterior sample, prompt dropout) comes from a generator seeded by
(seed, global step, batch index, rank), never from a global stream, so a resumed run draws what an
uninterrupted one would have drawn.

A batch is one of two kinds (HWC images, as the dataset gives them; B pairs):

- images (dataset.ControlDataset): jpg (B, H, W, 3) in [-1, 1], txt (B prompts), hint (B, H, W, 3) in [0, 1];
- cached (trainer.latent_cache): posterior (B, 2C, H/8, W/8), the VAE encoder's moments of the target (mean
  channels, then log-variance), context and empty_context (B, T, D), the text encoder's output for the
  pair's prompt and for "", plus txt and hint as above. The step draws from the posterior and chooses a
  context exactly as it would encode them itself: the same losses, without the VAE encoder or text encoder.

Locked parts in half precision (`locked_dtype`): the VAE, the text encoder and the frozen UNet are stored
in bf16 or fp16 and must run under autocast of that dtype (Lightning's bf16-mixed / 16-mixed); the trained
parameters keep fp32 master weights, and `state_dict()` gives fp32 copies of the half ones, so checkpoints
have the original layout and dtypes whatever the run's precision.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.utils.checkpoint
from torch import nn

from cldm.model import load_config, with_model_options
from cldm.sampling import sample_images
from common.lr_schedule import cosine_factor
from ldm.checkpoint import LoadReport, load_weights
from ldm.lazy_checkpoint import open_lazy
from ldm.modules.attention import AttentionKind
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config
from trainer.checkpointing import ResumeRefusedError
from trainer.logger import DEFAULT_DDIM_STEPS, DEFAULT_GUIDANCE_SCALE, DEFAULT_MAX_IMAGES
from trainer.resumable_data import derived_seed

# Devices with PyTorch's fused AdamW kernel (the fp32 trainable weights qualify).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# The optimizers of the trainable weights, all AdamW (the original's): PyTorch's default (foreach) kernel,
# its fused kernel (the same update in fewer launches; the default implementation where the device has no
# fused kernel), and bitsandbytes' 8-bit AdamW (Dettmers et al. 2022: both moments block-wise quantised to
# 8 bits, 2 bytes of state per weight instead of 8; tensors under 4096 elements keep fp32 state).
OPTIMIZERS = ("adamw", "adamw-fused", "adamw8bit")
DEFAULT_OPTIMIZER = "adamw-fused"
# The optional package of "adamw8bit" (not in requirements.txt).
BITSANDBYTES = "bitsandbytes"
# The form of each optimizer's saved state: a resume may switch between optimizers of one form only.
# Checkpoints written before the optimizer was a choice hold PyTorch AdamW state.
OPTIMIZER_STATE_FORMS = {"adamw": "PyTorch AdamW", "adamw-fused": "PyTorch AdamW", "adamw8bit": "bitsandbytes 8-bit"}
SAVED_OPTIMIZER_BEFORE_THE_CHOICE = "adamw"
# Values allowed in hyper_parameters: what torch.load(weights_only=True) reads back.
_PLAIN_TYPES = (str, int, float, bool, type(None))
# Keys of a cached batch (see the module doc).
CACHED_POSTERIOR = "posterior"
CACHED_CONTEXT = "context"
CACHED_EMPTY_CONTEXT = "empty_context"
# Storage dtypes of the locked parts (`locked_dtype`), by name so that they fit in hyper_parameters.
LOCKED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The storage dtype of the locked parts under each mixed precision (Lightning's names; training.py
# --half-locked). fp16 also for the VAE: under 16-mixed its convolutions already run in fp16 (autocast), so
# fp16 weights add no overflow risk; a non-finite encoding stops the cache build or the step with a message.
HALF_LOCKED_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
# The frozen encoders whose outputs a latent cache holds.
FROZEN_ENCODER_PREFIXES = ("first_stage_model.", "cond_stage_model.")


class MissingPackageError(ImportError):
    """An option needs an optional package that is not installed; the message says which and how to get it."""


def import_bitsandbytes() -> Any:
    """The bitsandbytes module, or MissingPackageError naming the option that needs it."""
    # Its CPU backend warns at import that a 4-bit matmul kernel (of a package we do not use) is missing.
    cpu_backend_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_backend_log.level
    cpu_backend_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        why = "is not installed" if err.name == BITSANDBYTES else f"does not import ({err})"
        raise MissingPackageError(f"--optimizer adamw8bit needs the {BITSANDBYTES} package, which {why}: "
                                  f"pip install {BITSANDBYTES}") from None
    finally:
        cpu_backend_log.setLevel(level)
    return bitsandbytes


def make_optimizer(name: str, parameters: Sequence[nn.Parameter], learning_rate: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over `parameters` (on `device`), with AdamW's defaults otherwise (betas (0.9, 0.999),
    eps 1e-8, weight decay 0.01)."""
    if name == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(parameters, lr=learning_rate)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    fused = name == "adamw-fused" and device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(parameters, lr=learning_rate, fused=fused or None)


def check_optimizer_resume(saved_hyperparameters: Mapping[str, Any], optimizer: str) -> None:
    """ResumeRefusedError when `optimizer` cannot take over the optimizer state of a checkpoint written
    with `saved_hyperparameters` (8-bit state and PyTorch AdamW's moments do not convert)."""
    saved = saved_hyperparameters.get("optimizer", SAVED_OPTIMIZER_BEFORE_THE_CHOICE)
    if OPTIMIZER_STATE_FORMS.get(saved) != OPTIMIZER_STATE_FORMS[optimizer]:
        raise ResumeRefusedError(f"--optimizer {optimizer}: the checkpoint holds {saved}'s state "
                                 f"({OPTIMIZER_STATE_FORMS.get(saved, 'unknown')}), which {optimizer} cannot "
                                 f"continue; resume with --optimizer {saved}, or start a new run with --init "
                                 f"CHECKPOINT")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite, or the weights did; no checkpoint of NaN weights is written."""


def training_model_config(config_path: str | os.PathLike, attention: AttentionKind | None = None,
                          gradient_checkpointing: bool | None = None,
                          only_mid_control: bool | None = None) -> dict[str, Any]:
    """The config's `model` section as plain dicts, with the run's choices written in (None keeps the
    config's value), so that the checkpoint alone rebuilds the same model."""
    model_config = with_model_options(load_config(config_path)["model"], attention, gradient_checkpointing)
    if only_mid_control is not None:
        model_config["params"]["only_mid_control"] = only_mid_control
    return model_config


# Learning-rate schedules: the original's constant rate, or a cosine decay from the rate at the first step to 0
# at the run's last (the trainer's max_steps), without warm-up (diffusers' train_controlnet.py names it cosine).
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_SCHEDULE = "constant"


def _check_options(prompt_dropout: float, seed: int, locked_dtype: str | None, optimizer: str,
                   lr_schedule: str = DEFAULT_LR_SCHEDULE) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not 0.0 <= prompt_dropout <= 1.0:
        raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if locked_dtype is not None and locked_dtype not in LOCKED_DTYPES:
        raise ValueError(f"locked_dtype must be None or one of {sorted(LOCKED_DTYPES)}, got {locked_dtype!r}")


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only plain values (str, int, "
                        f"float, bool, None, lists, dicts)")


def channels_first(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) as the dataset gives them -> (B, 3, H, W) float on `device` (a permuted view)."""
    return images.to(device).permute(0, 3, 1, 2).float()


def load_initial_weights(model: nn.Module, model_config: Mapping[str, Any], path: str | os.PathLike,
                         prefixes: tuple[str, ...] = ("",)) -> LoadReport:
    """Load a checkpoint (the tool_add_control output, a training checkpoint, ...) into `model`, built
    from `model_config`, one tensor at a time: an SD-size file never sits in memory beside the model
    (5.7 GB each; free Colab has 12.7 GB). The strict, explained key and shape check of `load_weights`
    runs first, on a meta-device copy of the model and the file's shapes. Only the model's keys that
    start with one of `prefixes` are read (default: all).
    """
    with open_lazy(path) as checkpoint:
        with torch.device("meta"):
            shadow = instantiate_from_config(model_config)
            shapes = {key: torch.empty(spec.shape, dtype=spec.dtype) for key, spec in checkpoint.specs.items()}
        report = load_weights(shadow, shapes, source=str(path))
        with torch.no_grad():
            # Keys of the model only: what load_weights ignores (EMA, stale buffers) is never read; what
            # it may fill (logvar) keeps the model's value.
            for key, target in model.state_dict().items():
                if key in checkpoint and key.startswith(prefixes):
                    target.copy_(checkpoint[key])
    return report


# ControlNet++'s reward (Li et al. 2024): only timesteps t <= this get the consistency loss (at larger t the
# one-step x0 prediction is too blurred for the condition extractor to read).
DEFAULT_CONSISTENCY_MAX_T = 200


def _check_consistency(weight: float, max_t: int) -> None:
    if not weight >= 0.0:
        raise ValueError(f"consistency_weight must be >= 0, got {weight}")
    if max_t < 0:
        raise ValueError(f"consistency_max_t must be >= 0, got {max_t}")


# The original's AdamW rate (tutorial_train.py).
DEFAULT_LEARNING_RATE = 1e-5
# The paper (section 3.3) replaces 50% of the prompts by "" so that the ControlNet learns the control
# image's meaning by itself (needed for guess mode and for strong guidance); the original tutorial used 0.
DEFAULT_PROMPT_DROPOUT = 0.5


class ControlNetTrainer(L.LightningModule):
    """Trains the ControlNet of a ControlLDM built from `model_config` (see `training_model_config`).

    learning_rate: AdamW's, as the original (1e-5). sd_locked: False also trains the UNet decoder
    (`output_blocks`, `out`). prompt_dropout: probability of replacing a prompt by "" (the paper: 0.5).
    seed: of the per-step generators. locked_dtype: None (fp32), "bfloat16" or "float16": the storage
    dtype of the locked parts (see the module doc; train under autocast of that dtype). optimizer: one of
    OPTIMIZERS (see there; "adamw8bit" needs bitsandbytes). channels_last: the whole model in NHWC memory
    format (oneDNN and cuDNN convolutions prefer it; the dataset's HWC images are already NHWC once permuted).
    compile: torch.compile the UNet's and the ControlNet's forward (`nn.Module.compile`: in place, so the
    state dict keys stay those of the original layout). consistency_weight: W > 0 adds ControlNet++'s
    cycle-consistency reward, W x the control type's consistency loss of the samples with t <=
    consistency_max_t (see `consistency_loss`); the control type is training_options["control"] (the
    dataset's control record), Canny when there is none. lr_schedule: one of LR_SCHEDULES ("cosine" decays
    over the trainer's max_steps, see `lr_factor`). training_options: plain values recorded in the
    checkpoint only.
    The weights are random until loaded: `load_initial_weights` or a Lightning `ckpt_path`.
    """

    def __init__(self, model_config: Mapping[str, Any], learning_rate: float = DEFAULT_LEARNING_RATE,
                 sd_locked: bool = True, prompt_dropout: float = DEFAULT_PROMPT_DROPOUT, seed: int = 0,
                 locked_dtype: str | None = None, optimizer: str = DEFAULT_OPTIMIZER, channels_last: bool = False,
                 compile: bool = False, consistency_weight: float = 0.0,
                 consistency_max_t: int = DEFAULT_CONSISTENCY_MAX_T, lr_schedule: str = DEFAULT_LR_SCHEDULE,
                 **training_options: Any):
        super().__init__()
        _check_options(prompt_dropout, seed, locked_dtype, optimizer, lr_schedule)
        _check_consistency(consistency_weight, consistency_max_t)
        model_config = copy.deepcopy(dict(model_config))
        _check_plain(model_config, "model_config")
        _check_plain(training_options, "training_options")
        # Every argument goes into the checkpoint (hparams), so a checkpoint rebuilds its trainer alone.
        self.save_hyperparameters()
        self.learning_rate, self.sd_locked, self.prompt_dropout = learning_rate, sd_locked, prompt_dropout
        self.seed, self.locked_dtype, self.optimizer_name = seed, locked_dtype, optimizer
        self.consistency_weight, self.consistency_max_t = consistency_weight, consistency_max_t
        self.lr_schedule = lr_schedule
        # Built on first use, on the module's device; a plain function (not a submodule), so that its
        # extractor's weights (HED, a depth model, ...) never enter the state dict.
        self._consistency_loss: Any = None
        self.model = instantiate_from_config(model_config)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.requires_grad_(False)
        for module in self.trainable_modules():
            module.requires_grad_(True)
        if locked_dtype is not None:
            for module in self.locked_modules():
                module.to(LOCKED_DTYPES[locked_dtype])
        if compile:
            for network in self.compiled_modules():
                network.compile()
        self.train()

    # ---- what trains ------------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        """The ControlNet, plus the UNet decoder when not sd_locked (the original's choice of params)."""
        modules: list[nn.Module] = [self.model.control_model]
        if not self.sd_locked:
            unet = self.model.model.diffusion_model
            modules += [unet.output_blocks, unet.out]
        return modules

    def locked_modules(self) -> list[nn.Module]:
        """The frozen networks: the VAE, the text encoder and the UNet (without its decoder when not sd_locked)."""
        unet = self.model.model.diffusion_model
        trainable = self.trainable_modules()
        frozen_unet = [unet] if self.sd_locked else [part for part in unet.children() if part not in trainable]
        return [self.model.first_stage_model, self.model.cond_stage_model, *frozen_unet]

    def compiled_modules(self) -> list[nn.Module]:
        """What `compile` compiles: the networks that run in every step with autograd, the UNet and the
        ControlNet (the VAE and text encoder run once per step without it, or not at all with a cache)."""
        return [self.model.model.diffusion_model, self.model.control_model]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.trainable_modules():
            yield from module.parameters()

    def train(self, mode: bool = True) -> ControlNetTrainer:
        """Train mode for what trains; the VAE, the text encoder and a locked UNet stay in eval."""
        super().train(mode)
        if self.sd_locked:
            self.model.model.diffusion_model.eval()
        return self

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.optimizer_name, list(self.trainable_parameters()), self.learning_rate,
                                   self.device)
        if self.lr_schedule == "constant":
            return optimizer
        # A partial of a module-level function: LambdaLR's state dict then holds no function, and a resumed run
        # decays over its own max_steps.
        factor = functools.partial(cosine_factor, total_steps=self._schedule_steps())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self) -> int:
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} decays over the run's max_steps, which is not set")
        return total

    def lr_factor(self, step: int) -> float:
        """The multiplier of the learning rate at optimizer step `step` (0-based) under this run's schedule."""
        if self.lr_schedule == "constant":
            return 1.0
        return cosine_factor(step, self._schedule_steps())

    # ---- checkpoint contract ----------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The ControlLDM's state dict (original key layout, no prefix), all floating tensors fp32: the
        locked parts stored in half precision are given as fp32 copies, made on their device (for SD
        1.5, 4.3 GB more while a checkpoint is written)."""
        state = self.model.state_dict(*args, **kwargs)
        if self.locked_dtype is None:
            return state
        return type(state)((key, value.float() if value.is_floating_point() else value)
                           for key, value in state.items())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a ControlLDM state dict; strict loading explains a mismatch (keys, shapes, likely cause)."""
        if strict:
            return load_weights(self.model, state_dict, source="checkpoint")
        return self.model.load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint with NaN weights must never replace a good one.
        finite = all(bool(torch.isfinite(p).all()) for p in self.trainable_parameters())
        if not finite:
            raise NonFiniteLossError(f"refusing to save a checkpoint at step {self.global_step}: the trainable "
                                     f"weights contain NaN or inf")

    # ---- batch -> loss ------------------------------------------------------------------------------
    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of one training batch, a function of (seed, global step, batch_idx, rank) only:
        these identify a batch also across gradient accumulation and a resume."""
        seed = derived_seed(self.seed, self.global_step, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def target_posterior(self, batch: Mapping[str, Any]) -> DiagonalGaussianDistribution:
        """q(z | target) over unscaled latents (B, C, H/8, W/8), from a cached batch's moments or the VAE
        encoder's for "jpg"; in fp32 whatever the VAE's dtype, so that latent samples, noise and loss
        target are fp32 (and the same for both kinds of batch)."""
        if CACHED_POSTERIOR in batch:
            moments = batch[CACHED_POSTERIOR]
        else:
            moments = self.model.encode_first_stage(channels_first(batch["jpg"], self.device)).parameters
        return DiagonalGaussianDistribution(moments.to(self.device, torch.float32))

    def text_context(self, batch: Mapping[str, Any], prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's output (B, T, D) for `prompts`, encoded now, or taken from a cached batch,
        which holds it for each pair's own prompt (batch["txt"]) and for "" only."""
        if CACHED_CONTEXT not in batch:
            return self.model.get_learned_conditioning(list(prompts))
        own = [prompt == pair_prompt for prompt, pair_prompt in zip(prompts, batch["txt"], strict=True)]
        empty = [prompt == "" for prompt in prompts]
        if not all(a or b for a, b in zip(own, empty, strict=True)):
            raise ValueError('a cached batch holds the text contexts of its own prompts and of "" only')
        use_empty = torch.tensor(empty, device=self.device).view(-1, 1, 1)
        return torch.where(use_empty, batch[CACHED_EMPTY_CONTEXT].to(self.device),
                           batch[CACHED_CONTEXT].to(self.device))

    def conditioning(self, batch: Mapping[str, Any], prompts: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        """{"c_crossattn": [context (B, T, D) of `prompts`], "c_concat": [hint (B, 3, H, W) in [0, 1]]}."""
        return {"c_crossattn": [self.text_context(batch, prompts)],
                "c_concat": [channels_first(batch["hint"], self.device)]}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """batch: images or cached (see the module doc). The loss of `batch_loss`, checked finite on every
        rank and logged."""
        loss, logs = self.batch_loss(batch, batch_idx)
        batch_size = len(batch["txt"])
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise NonFiniteLossError(
                f"the loss is {loss.item()} in training step {self.global_step + 1} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); stopped, keeping the weights of step {self.global_step}. Try a lower --lr, "
                f"--precision 32 or bf16-mixed instead of 16-mixed, or check the data.")
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def batch_loss(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The diffusion loss of one training batch and its logged parts, all that the step computes (the
        memory planner, bench/memory.py, runs it alone). The generator's draws, in this order: the VAE
        posterior sample, prompt dropout, timesteps, noise."""
        generator = self.step_generator(batch_idx)
        with torch.no_grad():
            z0 = self.model.get_first_stage_encoding(self.target_posterior(batch), generator=generator)
        batch_size = z0.shape[0]
        dropped = torch.rand(batch_size, generator=generator, device=self.device) < self.prompt_dropout
        prompts = ["" if drop else prompt for prompt, drop in zip(batch["txt"], dropped.tolist(), strict=True)]
        cond = self.conditioning(batch, prompts)
        t = torch.randint(0, self.model.num_timesteps, (batch_size,), generator=generator, device=self.device)
        noise = torch.randn(z0.shape, generator=generator, device=self.device, dtype=z0.dtype)
        if self.consistency_weight == 0:
            return self.model.p_losses(z0, cond, t, noise=noise)
        loss, logs, x_noisy, model_output = self.model.denoising_loss(z0, cond, t, noise=noise)
        reward = self.consistency_reward(z0, x_noisy, model_output, t, cond["c_concat"][0])
        logs["train/loss_consistency"] = reward.detach()
        loss = loss + self.consistency_weight * reward
        logs["train/loss"] = loss.detach()
        return loss, logs

    # ---- ControlNet++'s consistency reward ------------------------------------------------------------
    def consistency_loss(self) -> Any:
        """The control type's loss(images, hints, references) -> (B,) (annotator.consistency), built once on
        this module's device from the run's control record (Canny when the dataset has none)."""
        if self._consistency_loss is None:
            from annotator.consistency import build_consistency_loss
            from annotator.controls import parse_control_record

            control, settings, annotator_model = parse_control_record(self.hparams.get("control"))
            self._consistency_loss = build_consistency_loss(control, settings, annotator_model, self.device)
        return self._consistency_loss

    def decode_unit(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], float32, through the frozen VAE decoder: differentiable w.r.t. z
        (under no_grad, plain decoding), checkpointed (recomputed in the backward pass) when the run uses
        gradient checkpointing."""
        vae = self.model.first_stage_model
        unscaled = z / self.model.scale_factor
        if getattr(self.model.model.diffusion_model, "use_checkpoint", False):
            images = torch.utils.checkpoint.checkpoint(vae.decode, unscaled, use_reentrant=False)
        else:
            images = vae.decode(unscaled)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def consistency_reward(self, z0: torch.Tensor, x_noisy: torch.Tensor, model_output: torch.Tensor,
                           t: torch.Tensor, hints: torch.Tensor) -> torch.Tensor:
        """ControlNet++'s reward loss of one batch: for the samples with t <= consistency_max_t, predict x0
        in one step, decode it (gradients through the frozen decoder), and score it against the control with
        the type's consistency loss; the mean over those samples (0 when there are none). The label side
        is the training photo as the VAE reproduces it (the decoded clean latent), the same with and
        without a latent cache."""
        # Chosen by value on the host (as prompt dropout): an index list of known length also under the memory
        # planner's FakeTensorMode, where every timestep reads as 1, so that it plans for the whole batch.
        chosen = [index for index, step in enumerate(t.tolist()) if step <= self.consistency_max_t]
        if not chosen:
            return model_output.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) as in other steps
        chosen = torch.tensor(chosen, device=t.device)
        predicted = self.model.predict_start(x_noisy[chosen], t[chosen], model_output[chosen])
        images = self.decode_unit(predicted)
        with torch.no_grad():
            references = self.decode_unit(z0[chosen])
        return self.consistency_loss()(images, hints[chosen].float(), references).float().mean()

    # ---- images for the log -------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], max_images: int = DEFAULT_MAX_IMAGES,
                   ddim_steps: int = DEFAULT_DDIM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                   eta: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images of the first `max_images` pairs of a batch of either kind, each (N, 3, H, W) in [0, 1]:
        "reconstruction" (the target's posterior mean through the VAE decoder), "control" (the hint) and
        "samples" (DDIM with classifier-free guidance against the "" prompt, the same hint in both
        branches, as the original's log; 8-bit levels, the pixels inference.py would write). With
        half-precision locked parts, call it under their autocast (the ImageLogger uses the trainer's)."""
        n = min(max_images, len(batch["txt"]))
        batch = {key: value[:n] for key, value in batch.items()}
        z0 = self.model.get_first_stage_encoding(self.target_posterior(batch).mode())
        cond = self.conditioning(batch, list(batch["txt"]))
        samples = sample_images(self.model, cond["c_concat"][0], cond["c_crossattn"][0],
                                negative_prompt=self.text_context(batch, [""] * n), steps=ddim_steps, eta=eta,
                                guidance_scale=guidance_scale, generator=generator)
        reconstruction = ((self.model.decode_first_stage(z0).float() + 1) / 2).clamp(0, 1)
        return {"reconstruction": reconstruction,
                "control": cond["c_concat"][0].float().clamp(0, 1),
                "samples": torch.from_numpy(samples).to(self.device).permute(0, 3, 1, 2).float() / 255}
