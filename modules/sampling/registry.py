"""The sampler table: A1111's sampler names, each mapped to a sampling function of k-diffusion's
form (k-diffusion's own, or modules.sampling.samplers for those it lacks) and the options it
needs, and `run_sampler`, which calls one with per-image seeded noise.

Facts per sampler follow A1111's sd_samplers_kdiffusion, sd_samplers_timesteps and
sd_samplers_lcm: default schedule ("scheduler"), "second_order", "brownian_noise", "uses_ensd"
(here: ancestral noise), "discard_next_to_last_sigma", "solver_type".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from k_diffusion import sampling as kd

from modules.sampling import samplers
from modules.sampling.noise import ancestral_noise_sampler, brownian_noise_sampler
from modules.sampling.schedules import SCHEDULES, find_schedule


def one_step_safe(fn: Callable) -> Callable:
    """`fn` (k-diffusion's DPM++ 2M SDE or 3M SDE), except on a one-step schedule [sigma, 0]:
    they carry the last step's size over even from a step that ends at 0 and so computes none,
    which fails when that step is the first. A step to 0 is a plain denoise in every sampler, as
    Euler's is."""

    @functools.wraps(fn)
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        if len(sigmas) == 2 and sigmas[-1] == 0:
            return kd.sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kwargs)

    return sample


# How a sampler takes its noise levels.
def _sigma_list(sigmas: torch.Tensor) -> dict:
    return {"sigmas": sigmas}


def _sigma_range(sigmas: torch.Tensor) -> dict:
    # DPM adaptive picks its own levels between the ends of the schedule (0 is not allowed).
    return {"sigma_min": float(sigmas[sigmas > 0].min()), "sigma_max": float(sigmas.max())}


def _sigma_range_and_count(sigmas: torch.Tensor) -> dict:
    # DPM fast: the same range, with one model evaluation per step of the schedule.
    return {**_sigma_range(sigmas), "n": len(sigmas) - 1}


def step_at(sigma, sigmas: torch.Tensor) -> int:
    """The step of the schedule whose interval (sigmas[k], sigmas[k + 1]] holds `sigma`: k for
    sigma == sigmas[k]. Samplers that recompute levels as exp(-(-log sigma)) are a rounding off,
    hence the small tolerance."""
    inner = sigmas[1:-1]
    return int((inner >= float(sigma) * (1 - 1e-5)).sum())


# Which noise sampler a sampler gets: (x, sigmas, seeds, source, seed_delta) -> noise_sampler.
# "stream" is the image's own stream without the seed delta: A1111 applies "eta noise seed delta"
# only to the samplers it marks uses_ensd, and Restart and LCM draw their noise unmarked.
NOISE = {
    "ancestral": lambda x, sigmas, seeds, source, delta: ancestral_noise_sampler(x, seeds, source, delta),
    "brownian": lambda x, sigmas, seeds, source, delta: brownian_noise_sampler(x, sigmas, seeds, source),
    "stream": lambda x, sigmas, seeds, source, delta: ancestral_noise_sampler(x, seeds, source),
}


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # A1111's label, used in the UI, the API and the infotext
    aliases: tuple[str, ...]  # A1111's API names
    fn: Callable  # k-diffusion sampler signature: (model, x, sigmas | sigma range, extra_args, callback, disable, ...)
    default_schedule: str  # a schedules.SCHEDULES name, used for "Automatic"
    noise: str | None = None  # a NOISE kind: "ancestral" / "stream" (fresh noise each step), "brownian" (SDE)
    second_order: bool = False  # two model evaluations per step
    discard_penultimate_sigma: bool = False  # schedule made for steps + 1, next-to-last level dropped
    sigma_args: Callable[[torch.Tensor], dict] = _sigma_list
    own_levels: bool = False  # picks its own levels between the schedule's ends (DPM fast / adaptive)
    kwargs: tuple[tuple[str, Any], ...] = ()  # fixed extra keyword arguments for fn
    cfg_scale_factor: float = 1.0  # the request's CFG scale times this is the guidance scale used
    uses_uncond: bool = False  # fn takes `uncond_denoised`: () -> the last call's negative-prompt estimate

    @property
    def ancestral(self) -> bool:
        return self.noise == "ancestral"

    @property
    def brownian(self) -> bool:
        return self.noise == "brownian"

    @property
    def options(self) -> dict[str, str]:
        """A1111's /sdapi/v1/samplers "options" for this sampler."""
        flags = {
            "scheduler": self.default_schedule if self.default_schedule != "uniform" else None,
            "second_order": self.second_order,
            "brownian_noise": self.brownian,
            "uses_ensd": self.ancestral,
            "discard_next_to_last_sigma": self.discard_penultimate_sigma,
            "solver_type": dict(self.kwargs).get("solver_type"),
        }
        return {key: str(value) for key, value in flags.items() if value}

    def model_calls(self, steps: int) -> int:
        """Roughly how many model evaluations `steps` steps take (for time estimates)."""
        return steps * 2 if self.second_order else steps


# A1111's defaults: ancestral-noise samplers and DPM fast / adaptive run with eta 1
# (its "eta for ancestral samplers" setting), the others are deterministic ODE solvers.
# A1111 runs DDIM, DDIM CFG++ and PLMS on DDIM's timesteps, hence their "ddim" default; UniPC on
# timesteps evenly spaced from the highest to 0, which "sgm_uniform" gives (ending at 0 where
# A1111 stops at the lowest level).
SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", ("k_dpmpp_2m",), kd.sample_dpmpp_2m, "karras"),
    SamplerInfo("DPM++ SDE", ("k_dpmpp_sde",), kd.sample_dpmpp_sde, "karras", noise="brownian", second_order=True),
    SamplerInfo("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), one_step_safe(kd.sample_dpmpp_2m_sde), "exponential", noise="brownian"),
    SamplerInfo(
        "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), one_step_safe(kd.sample_dpmpp_2m_sde), "exponential",
        noise="brownian", kwargs=(("solver_type", "heun"),),
    ),
    SamplerInfo("DPM++ 2S a", ("k_dpmpp_2s_a",), kd.sample_dpmpp_2s_ancestral, "karras", noise="ancestral", second_order=True),
    SamplerInfo(
        "DPM++ 3M SDE", ("k_dpmpp_3m_sde",), one_step_safe(kd.sample_dpmpp_3m_sde), "exponential",
        noise="brownian", discard_penultimate_sigma=True,
    ),
    SamplerInfo("Euler a", ("k_euler_a", "k_euler_ancestral"), kd.sample_euler_ancestral, "uniform", noise="ancestral"),
    SamplerInfo("Euler", ("k_euler",), kd.sample_euler, "uniform"),
    SamplerInfo("LMS", ("k_lms",), kd.sample_lms, "uniform"),
    SamplerInfo("Heun", ("k_heun",), kd.sample_heun, "uniform", second_order=True),
    SamplerInfo("DPM2", ("k_dpm_2",), kd.sample_dpm_2, "karras", second_order=True, discard_penultimate_sigma=True),
    SamplerInfo(
        "DPM2 a", ("k_dpm_2_a",), kd.sample_dpm_2_ancestral, "karras",
        noise="ancestral", second_order=True, discard_penultimate_sigma=True,
    ),
    SamplerInfo(
        "DPM fast", ("k_dpm_fast",), kd.sample_dpm_fast, "uniform", noise="ancestral",
        sigma_args=_sigma_range_and_count, own_levels=True, kwargs=(("eta", 1.0),),
    ),
    SamplerInfo(
        "DPM adaptive", ("k_dpm_ad",), kd.sample_dpm_adaptive, "uniform", noise="ancestral",
        sigma_args=_sigma_range, own_levels=True, kwargs=(("eta", 1.0),),
    ),
    SamplerInfo("Restart", ("restart",), samplers.sample_restart, "karras", noise="stream", second_order=True),
    SamplerInfo("DDIM", ("ddim",), samplers.sample_ddim, "ddim"),
    # CFG++'s guidance lambda in [0, 1] is A1111's CFG scale / 12.5.
    SamplerInfo(
        "DDIM CFG++", ("ddim_cfgpp",), samplers.sample_ddim_cfgpp, "ddim", cfg_scale_factor=1 / 12.5, uses_uncond=True,
    ),
    SamplerInfo("PLMS", ("plms",), samplers.sample_plms, "ddim"),
    SamplerInfo("UniPC", ("unipc",), samplers.sample_unipc, "sgm_uniform"),
    SamplerInfo("LCM", ("k_lcm",), samplers.sample_lcm, "uniform", noise="stream"),
)

_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


def find_sampler(name: str) -> SamplerInfo:
    """A sampler by its name or an A1111 API alias, any case."""
    found = _BY_NAME.get(str(name).strip().lower())
    if found is None:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(s.name for s in SAMPLERS)}")
    return found


def find_sampler_and_schedule(sampler_name: str, schedule_name: str | None = None):
    """(SamplerInfo, Schedule) for names that may be in A1111's older combined form, where the
    schedule was part of the sampler name ("DPM++ 2M Karras" = DPM++ 2M with the Karras schedule).
    A schedule named in the sampler name wins over `schedule_name`."""
    name = str(sampler_name).strip()
    if name.lower() not in _BY_NAME:
        for schedule in SCHEDULES:
            for suffix in (schedule.label, *schedule.aliases):
                head = name[: -len(suffix)].rstrip()
                if name.lower().endswith(" " + suffix.lower()) and head.lower() in _BY_NAME:
                    return find_sampler(head), schedule
    return find_sampler(name), find_schedule(schedule_name)


def run_sampler(
    info: SamplerInfo,
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    seeds: Sequence[int],
    noise_source: str = "cpu",
    noise_seed_delta: int = 0,
) -> torch.Tensor:
    """Runs `info`'s sampler from x (noise already scaled to sigmas[0]) down the levels `sigmas`.

    `callback(d)` gets k-diffusion's dict ("x", "i", "sigma", "denoised", ...) once per step, with
    "i" the 0-based index of the step in `sigmas`. Before it is called, `denoiser.step` (when the
    denoiser has one, as CFGDenoiser does) becomes its value at the start + i + 1, so the next
    step's evaluations use the next step's prompt. DPM fast / adaptive take steps of their own:
    for them "i" is the step of the schedule that the reported sigma falls in (see `step_at`,
    so "i" may skip or repeat), and `denoiser.step` is set before every model evaluation from
    the sigma it is made at. An exception raised by the callback (interrupt, skip) stops sampling
    and propagates unchanged.

    `seeds` (one per image) and `noise_source` ('cpu' / 'gpu') seed the noise that ancestral, SDE,
    Restart and LCM samplers add during sampling; `noise_seed_delta` is A1111's "eta noise seed delta".

    A sampler with a `cfg_scale_factor` gets extra_args' "cond_scale" scaled by it. One that
    `uses_uncond` (CFG++) turns the denoiser's `report_uncond` on for the run, where it has one
    (CFGDenoiser), and reads the negative prompt's estimate from its `uncond_denoised`.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]} images")
    if len(sigmas) < 2:
        raise ValueError("sigmas must hold at least two noise levels")
    kwargs = dict(info.kwargs)
    kwargs.update(info.sigma_args(sigmas))
    if info.noise is not None:
        kwargs["noise_sampler"] = NOISE[info.noise](x, sigmas, seeds, noise_source, noise_seed_delta)
    extra_args = dict(extra_args or {})
    if info.cfg_scale_factor != 1 and "cond_scale" in extra_args:
        extra_args["cond_scale"] = extra_args["cond_scale"] * info.cfg_scale_factor
    reports_uncond = info.uses_uncond and hasattr(denoiser, "report_uncond")
    if info.uses_uncond:
        kwargs["uncond_denoised"] = (lambda: denoiser.uncond_denoised) if reports_uncond else None

    first_step = getattr(denoiser, "step", None)
    model = denoiser
    if info.own_levels and first_step is not None:

        def model(latent, sigma, **model_args):
            denoiser.step = first_step + step_at(sigma.max(), sigmas)
            return denoiser(latent, sigma, **model_args)

    def on_step(d: dict) -> None:
        i = step_at(d["sigma"], sigmas) if info.own_levels else int(d["i"])
        if first_step is not None:
            denoiser.step = first_step + i + 1
        if callback is not None:
            callback({**d, "i": i})

    if reports_uncond:
        denoiser.report_uncond = True
    try:
        return info.fn(model, x, extra_args=extra_args, callback=on_step, disable=True, **kwargs)
    finally:
        if reports_uncond:
            denoiser.report_uncond = False
