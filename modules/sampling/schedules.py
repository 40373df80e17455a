"""Sigma schedules: which noise levels a sampler visits.

Each schedule is a pure function of (steps, sigma_min, sigma_max, model denoiser): it reads the
denoiser's discrete sigma table but never calls the model. `get_sigmas` returns steps + 1 levels
from high to low ending in 0, on the CPU, as float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from k_diffusion.sampling import get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential


def _uniform(n, sigma_min, sigma_max, denoiser):
    # The model's own discrete levels, evenly spaced in timestep (k-diffusion's get_sigmas).
    return denoiser.get_sigmas(n)


def _karras(n, sigma_min, sigma_max, denoiser):
    return get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)


def _exponential(n, sigma_min, sigma_max, denoiser):
    return get_sigmas_exponential(n, sigma_min, sigma_max)


def _polyexponential(n, sigma_min, sigma_max, denoiser):
    return get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0)


def _sgm_uniform(n, sigma_min, sigma_max, denoiser):
    # Evenly spaced timesteps from max to min over n + 1 points, the last dropped (SGM's "trailing").
    device = denoiser.sigmas.device
    start = denoiser.sigma_to_t(torch.tensor(sigma_max, device=device))
    end = denoiser.sigma_to_t(torch.tensor(sigma_min, device=device))
    timesteps = torch.linspace(float(start), float(end), n + 1, device=device)[:-1]
    sigmas = denoiser.t_to_sigma(timesteps)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _ddim(n, sigma_min, sigma_max, denoiser):
    # DDIM's "uniform" discretisation: timesteps 1, 1 + c, 1 + 2c, ... with c = T // n, n of them.
    count = len(denoiser.sigmas)
    stride = max(count // n, 1)
    timesteps = (torch.arange(n, device=denoiser.sigmas.device) * stride + 1).clamp(max=count - 1)
    sigmas = denoiser.sigmas[timesteps.flip(0)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class Schedule:
    name: str  # A1111's API name
    label: str  # what the UI and the infotext's "Schedule type" show
    fn: Callable | None  # (n, sigma_min, sigma_max, denoiser) -> Tensor[n + 1]; None: the sampler's default
    aliases: tuple[str, ...] = ()


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic", None),
    Schedule("uniform", "Uniform", _uniform),
    Schedule("karras", "Karras", _karras),
    Schedule("exponential", "Exponential", _exponential),
    Schedule("polyexponential", "Polyexponential", _polyexponential),
    Schedule("sgm_uniform", "SGM Uniform", _sgm_uniform, aliases=("SGMUniform",)),
    Schedule("ddim", "DDIM", _ddim),
)

_BY_NAME = {key.lower(): s for s in SCHEDULES for key in (s.name, s.label, *s.aliases)}


def find_schedule(name: str | None) -> Schedule:
    """A schedule by label, API name or alias, any case; None or '' mean Automatic."""
    found = _BY_NAME.get((name or "automatic").strip().lower())
    if found is None:
        raise ValueError(f"Unknown schedule type {name!r}; choose one of: {', '.join(s.label for s in SCHEDULES)}")
    return found


def get_sigmas(schedule_name: str | None, steps: int, denoiser, sampler=None) -> torch.Tensor:
    """Noise levels for `steps` sampling steps: Tensor[steps + 1], decreasing, last 0, CPU float32.

    `denoiser` is the model denoiser (modules.sampling.denoiser.model_denoiser), whose discrete
    sigmas give sigma_min / sigma_max. `sampler` (a registry.SamplerInfo) decides what Automatic
    means and whether the next-to-last level is dropped (DPM2, DPM2 a, DPM++ 3M SDE, as in A1111).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")
    schedule = find_schedule(schedule_name)
    if schedule.fn is None:
        schedule = find_schedule(sampler.default_schedule if sampler is not None else "uniform")
    discard = sampler is not None and sampler.discard_penultimate_sigma
    n = steps + 1 if discard else steps
    sigma_min, sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
    with torch.no_grad():
        sigmas = schedule.fn(n, sigma_min, sigma_max, denoiser).detach().to("cpu", torch.float32)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def img2img_start(steps: int, strength: float) -> int:
    """Where img2img enters the `steps + 1` levels of `get_sigmas`: it samples sigmas[start:].

    A1111's rule (with "img2img_fix_steps" off): t_enc = int(min(strength, 0.999) * steps) and
    the run takes the last t_enc + 2 levels, i.e. t_enc + 1 steps. So 20 steps at strength 0.5
    run 11 steps from sigmas[9] and strength 1 runs all 20 from sigma_max. At strength 0 A1111
    still takes one step from the smallest level; here there is nothing to denoise and no step
    is taken (start = steps), so the picture comes back as the VAE gives it."""
    if strength <= 0:
        return steps
    t_enc = int(min(float(strength), 0.999) * steps)
    return steps - t_enc - 1


def img2img_steps(steps: int, strength: float) -> int:
    """How many steps img2img samples of a `steps`-step schedule at `strength` (see img2img_start)."""
    return steps - img2img_start(steps, strength)
