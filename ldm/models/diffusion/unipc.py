"""UniPC sampling (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") for a DDPM `alphas_cumprod`, with classifier-free guidance.

ControlNet++ (Li et al. 2024) evaluates its ControlNets with diffusers' UniPCMultistepScheduler built from
SD 1.5's scheduler config at 20 steps; this is that variant, written for the project's models: the data
(x0) prediction form ("predict_x0"), the B(h) = e^h - 1 corrector/predictor ("bh2"), order 2 with lower
orders for the first step (warm-up) and the last ("lower_order_final"), the corrector after every step
but the last, "linspace" timesteps and a final noise level of zero, so the last step returns the model's
x0 prediction. `UniPCSchedule` holds the coefficients and takes the steps; `UniPCSampler` runs the loop
around a model with DDIMSampler's `sample(...)` call shape (and its guided-output code).

Symbols (the paper's, for a VP schedule with alpha_bar = a):
    alpha_t, sigma_t    sqrt(a), sqrt(1 - a) at a point of the schedule (alpha 1, sigma 0 at the end)
    lambda_t            log(alpha_t / sigma_t), the half log-SNR (+inf at the end)
    h                   lambda_t - lambda_s for the step s -> t;  hh = -h in the data-prediction form
    m_i                 the model's x0 prediction at point i (the "model outputs" the multistep keeps)
    r_k, D_k            (lambda_{s_k} - lambda_s) / h and (m_{s_k} - m_s) / r_k for the k-th earlier point
    B(h)                e^hh - 1 ("bh2") or hh ("bh1")
    b_k                 k! * hh * phi_{k+1}(hh) / B(h), phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
    step s -> t         x_t = sigma_t / sigma_s * x_s - alpha_t (e^hh - 1) m_s - alpha_t B(h) sum_k rho_k D_k
    UniP-p              rho solves sum_k rho_k r_k^(j-1) = b_j, j = 1..p-1, over the p-1 earlier points
                        (rho = 1/2 for p = 2, as the UniPC authors' code and diffusers take it)
    UniC-p              the same step redone once the model has been evaluated at x_t, with D_p = m_t - m_s and
                        r_p = 1 added: rho solves j = 1..p (rho = 1/2 for p = 1). It costs no model call: the
                        output at the uncorrected x_t is the one the next predictor uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import _check_unsupported, _eps_and_x0, guided_output

SOLVER_TYPES = ("bh1", "bh2")


def unipc_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers' "linspace" spacing: round(k * ((T - 1) / N)) for k = N, N-1, ..., 1 (descending; the noisiest
    first), in float64 and rounded half to even as numpy's linspace and round give them.

    Exact arithmetic would differ at ties: with 26 steps, k = 13 is 499.5 exactly but 499.49999999999994 in
    float64 (timestep 499, not 500), so the float recipe is kept to get diffusers' timesteps. SD 1.5's
    steps_offset plays no part in this spacing.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"number of UniPC steps must be in 1..{num_train_timesteps}, got {num_steps}")
    step = (num_train_timesteps - 1) / num_steps
    steps = [round(k * step) for k in range(num_steps - 1, 0, -1)]
    return torch.tensor([num_train_timesteps - 1, *steps], dtype=torch.long)


def _b_coefficients(hh: float, order: int, b_h: float) -> list[float]:
    """b_1..b_order = k! * hh * phi_{k+1}(hh) / B(h), by the phi recursion (hh * phi_{k+1} = phi_k - 1/k!)."""
    phi = math.expm1(hh) / hh  # phi_1(hh)
    out = []
    factorial = 1.0
    for k in range(1, order + 1):
        factorial *= k
        phi_next_times_hh = phi - 1.0 / factorial  # hh * phi_{k+1}(hh)
        out.append(factorial * phi_next_times_hh / b_h)
        phi = phi_next_times_hh / hh
    return out


class UniPCSchedule:
    """Timesteps and the multistep update of UniPC for a DDPM `alphas_cumprod` (float32, (T,)).

    Points 0..N: the N timesteps (descending) and the clean end (alpha 1, sigma 0). Step i goes from point i
    to point i + 1 with order `orders[i]` = min(order, i + 1, N - i). Coefficients are float64.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int, order: int = 2, solver_type: str = "bh2"):
        if order < 1:
            raise ValueError(f"UniPC order must be at least 1, got {order}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"UniPC solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        ac = alphas_cumprod.detach().double().cpu()
        self.timesteps = unipc_timesteps(num_steps, ac.shape[0])
        self.solver_type = solver_type
        a = ac[self.timesteps].tolist()
        self.alpha_bars = a
        self.alphas = [math.sqrt(v) for v in a] + [1.0]
        self.sigmas = [math.sqrt(1.0 - v) for v in a] + [0.0]
        self.lambdas = [0.5 * (math.log(v) - math.log1p(-v)) for v in a] + [math.inf]
        n = len(self.timesteps)
        self.orders = [min(order, i + 1, n - i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.timesteps)

    def x0(self, output: torch.Tensor, index: int, x: torch.Tensor, parameterization: str = "eps") -> torch.Tensor:
        """The x0 prediction m_index from a model output (eps, v or x0) at x, point `index`."""
        return _eps_and_x0(output, x, self.alpha_bars[index], parameterization)[1]

    def update(self, x: torch.Tensor, index: int, history: Sequence[torch.Tensor],
               x0_next: torch.Tensor | None = None) -> torch.Tensor:
        """x at point index + 1 from x at point `index`, with order orders[index].

        history: x0 predictions m_index, m_{index-1}, ... (newest first; at least the order's count). x0_next
        None: the predictor UniP; else the corrector UniC with m_{index+1}, the prediction at the predicted x.
        """
        p = self.orders[index]
        if len(history) < p:
            raise ValueError(f"UniPC step {index} of order {p} needs {p} x0 predictions, got {len(history)}")
        s, t = index, index + 1
        h = self.lambdas[t] - self.lambdas[s]
        hh = -h
        b_h = math.expm1(hh) if self.solver_type == "bh2" else hh
        m_s = history[0]
        x_next = (self.sigmas[t] / self.sigmas[s]) * x - (self.alphas[t] * math.expm1(hh)) * m_s
        ratios = [(self.lambdas[s - k] - self.lambdas[s]) / h for k in range(1, p)]
        diffs = [(history[k] - m_s) / r for k, r in zip(range(1, p), ratios, strict=True)]
        if x0_next is None:
            rhos = self._rhos(ratios, _b_coefficients(hh, p - 1, b_h)) if p > 2 else [0.5] * (p - 1)
        else:
            ratios.append(1.0)
            diffs.append(x0_next - m_s)
            rhos = self._rhos(ratios, _b_coefficients(hh, p, b_h)) if p > 1 else [0.5]
        if rhos:
            x_next = x_next - (self.alphas[t] * b_h) * sum(rho * d for rho, d in zip(rhos, diffs, strict=True))
        return x_next

    @staticmethod
    def _rhos(ratios: Sequence[float], b: Sequence[float]) -> list[float]:
        """rho solving sum_k rho_k r_k^j = b_{j+1}, j = 0..len(b)-1 (a Vandermonde system, float64)."""
        matrix = torch.tensor([[r**j for r in ratios] for j in range(len(b))], dtype=torch.float64)
        return torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()


class UniPCSampler:
    """UniPC around a diffusion model that has `apply_model(x, t, cond, **model_kwargs)`, `alphas_cumprod`
    and `parameterization` ("eps", "v" or "x0"); the same construction and `sample(...)` call as DDIMSampler.

    order: the multistep order (2, ControlNet++'s and diffusers' default, for guided sampling). solver_type:
    "bh2" (default) or "bh1". batch_cfg: as DDIMSampler's.
    """

    def __init__(self, model: Any, schedule: str = "linear", *, batch_cfg: bool = True, order: int = 2,
                 solver_type: str = "bh2"):
        if schedule != "linear":
            raise NotImplementedError(f"UniPCSampler: schedule={schedule!r} is not supported (only 'linear', the "
                                      f"model's own alphas_cumprod)")
        if order < 1:
            raise ValueError(f"UniPCSampler: order must be at least 1, got {order}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"UniPCSampler: solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        self.model = model
        self.schedule = schedule
        self.batch_cfg = batch_cfg
        self.order = order
        self.solver_type = solver_type

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Sequence[float] | None = None,
        *,
        generator: torch.Generator | None = None,
        control_scales: float | Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample latents (batch_size, *shape) in S UniPC steps (S model evaluations), with DDIMSampler's
        arguments and returns.

        eta: must be 0 (UniPC here is the deterministic ODE solver). The other arguments mean what they mean
        for DDIMSampler.sample: callback(i), img_callback(pred_x0, i), ucg_schedule (one scale per step),
        generator (for x_T when not given), control_scales (passed to `apply_model`). Returns (samples,
        {"x_inter": [...], "pred_x0": [...]}): x_T first, then the state after the first step and after
        every step whose countdown index (S - 1 - i) is a multiple of log_every_t.
        """
        _check_unsupported(locals(), "UniPCSampler.sample")
        if eta != 0:
            raise ValueError(f"UniPCSampler.sample: eta={eta!r}; UniPC is deterministic (eta must be 0; DDIM "
                             f"takes eta)")
        schedule = UniPCSchedule(self.model.alphas_cumprod, S, self.order, self.solver_type)
        if ucg_schedule is not None and len(ucg_schedule) != len(schedule):
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(schedule)} UniPC steps")
        model_kwargs = {} if control_scales is None else {"control_scales": control_scales}
        device = self.model.alphas_cumprod.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator, device=device)
        x = x_T.to(device)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        history: list[torch.Tensor] = []  # x0 predictions, newest first
        x_before = x  # the state the last predictor started from, for the corrector
        total = len(schedule)
        for i in tqdm(range(total), desc="UniPC", total=total, disable=not verbose, leave=False):
            t = torch.full((x.shape[0],), int(schedule.timesteps[i]), device=device, dtype=torch.long)
            scale = unconditional_guidance_scale if ucg_schedule is None else ucg_schedule[i]
            output = guided_output(self.model, x, t, conditioning, unconditional_conditioning, scale, model_kwargs,
                                   batch_cfg=self.batch_cfg)
            pred_x0 = schedule.x0(output, i, x, self.model.parameterization)
            if i > 0:
                x = schedule.update(x_before, i - 1, history, x0_next=pred_x0)
            history = [pred_x0, *history[: self.order - 1]]
            x_before = x
            x = schedule.update(x, i, history)
            if (total - 1 - i) % log_every_t == 0 or i == 0:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
        return x, intermediates
