"""Stage 2 of the toy base: train the text-conditioned UNet on the VAE's latents (eps-prediction).

The loss is the model's own `LatentDiffusion.p_losses`. The latents and the text contexts are computed
once (the VAE and the text encoder are frozen), so a step costs one UNet forward and backward. The
weights kept are an exponential moving average of the trained ones (as SD's released EMA weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from ldm.models.diffusion.ddpm import LatentDiffusion
from toy.schedule import make_optimizer

# Averages over the last ~500 steps: a run's early weights stay out of the average.
DEFAULT_EMA_DECAY = 0.998
# A share of the prompts replaced by "" so that classifier-free guidance has an unconditional model.
DEFAULT_PROMPT_DROPOUT = 0.1


@torch.no_grad()
def encode_prompts(model: LatentDiffusion, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{prompt: context (77, context_dim)} for the distinct prompts and the empty prompt."""
    distinct = sorted(set(prompts) | {""})
    contexts = model.get_learned_conditioning(distinct)
    return dict(zip(distinct, contexts, strict=True))


@torch.no_grad()
def _update_ema(ema: nn.Module, live: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), live.parameters(), strict=True):
        ema_param.lerp_(param, 1.0 - decay)


def train_unet(model: LatentDiffusion, latents: torch.Tensor, prompts: list[str], steps: int, batch_size: int,
               learning_rate: float, ema_decay: float = DEFAULT_EMA_DECAY,
               prompt_dropout: float = DEFAULT_PROMPT_DROPOUT, generator: torch.Generator | None = None,
               progress: bool = True) -> float:
    """Train `model.model.diffusion_model` on scaled latents (N, C, h, w) with their prompts (N strings).

    At the end the UNet holds the EMA weights. Returns the mean loss of the last 10% of steps.
    """
    if len(latents) != len(prompts):
        raise ValueError(f"{len(latents)} latents but {len(prompts)} prompts")
    contexts = encode_prompts(model, prompts)
    context_table = torch.stack([contexts[p] for p in prompts])  # (N, 77, D)
    empty = contexts[""]
    unet = model.model.diffusion_model
    unet.requires_grad_(True)
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer, scheduler = make_optimizer(unet.parameters(), learning_rate, steps)
    tail = []
    bar = tqdm(range(steps), desc="UNet", disable=not progress)
    for step in bar:
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        context = context_table[index].clone()
        dropped = torch.rand(batch_size, generator=generator) < prompt_dropout
        context[dropped] = empty
        t = torch.randint(model.num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        loss, _ = model.p_losses(latents[index], {"c_crossattn": [context]}, t, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        _update_ema(ema, unet, ema_decay)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.load_state_dict(ema.state_dict())
    unet.eval()
    unet.requires_grad_(False)
    return sum(tail) / len(tail)
