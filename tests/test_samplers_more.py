"""The samplers of A1111's table beyond the classic k-diffusion ones: DPM++ 2M SDE Heun, Restart,
DDIM CFG++, PLMS, UniPC and LCM. Each is compared with a reference on the same model and noise
(diffusers' schedulers stepping the same noise-prediction model, k-diffusion, the papers'
equations), then run through the pipeline on the built-in model, and looked up in the API's list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, PNDMScheduler, UniPCMultistepScheduler
from fastapi import FastAPI
from fastapi.testclient import TestClient
from k_diffusion import sampling as kd

from modules.api import routes
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models.sd_model import scaled_linear_alphas_cumprod
from modules.prompting.conditioning import Conditioning, ScheduledCond
from modules.sampling.denoiser import CFGDenoiser, EpsDenoiser
from modules.sampling.noise import brownian_noise_sampler, image_noise
from modules.sampling.registry import SAMPLERS, find_sampler, run_sampler
from modules.sampling.schedules import get_sigmas

NEW = ["DPM++ 2M SDE Heun", "Restart", "DDIM CFG++", "PLMS", "UniPC", "LCM"]
ALPHAS = scaled_linear_alphas_cumprod()
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def mixture_eps(x, t, shift=0.0):
    """The exact noise prediction at timestep t for data whose every value comes from one of two
    Gaussians (means -1 and 0.5, plus `shift`; std 0.25): nonlinear in x, unlike one Gaussian's,
    so a multistep method's history and a corrector change the result."""
    alpha = ALPHAS[t.round().long()].view(-1, 1, 1, 1).double()
    var_noise = (1 - alpha) / alpha
    x0_scale = x.double() / alpha.sqrt()
    shift = torch.as_tensor(shift, dtype=torch.float64).view(-1, 1, 1, 1)
    means = [m + shift for m in (-1.0, 0.5)]
    var = 0.25**2 + var_noise
    weights = torch.softmax(torch.stack([-((x0_scale - m) ** 2) / (2 * var) for m in means]), 0)
    mean = sum(w * (0.25**2 * x0_scale + var_noise * m) / var for w, m in zip(weights, means))
    return ((x0_scale - mean) / var_noise.sqrt()).to(x.dtype)


class MixtureModel:
    """An SD 1.x-like model (noise prediction on SD's noise table) that is exact for the mixture;
    a context's first value shifts the data, so a prompt and a negative prompt differ."""

    alphas_cumprod = ALPHAS
    prediction = "eps"

    def apply_model(self, x, t, context=None):
        return mixture_eps(x, t, 0.0 if context is None else context[:, 0, 0])


DENOISER = EpsDenoiser(MixtureModel())
PLAIN = {"context": None}


def noise(seed=0, shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def to_kd(x_vp, sigma):
    """diffusers' x_t = sqrt(alpha_bar) (x0 + sigma eps) in k-diffusion's scale x0 + sigma eps."""
    return x_vp * (float(sigma) ** 2 + 1) ** 0.5


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- the table and the API --------------------------------------------------------------------------

A1111_OPTIONS = {
    "DPM++ 2M SDE Heun": (["k_dpmpp_2m_sde_heun"], {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"}),
    "Restart": (["restart"], {"scheduler": "karras", "second_order": "True"}),
    # A1111 runs these on its own timesteps and lists no schedule; here the schedule that gives them.
    "DDIM CFG++": (["ddim_cfgpp"], {"scheduler": "ddim"}),
    "PLMS": (["plms"], {"scheduler": "ddim"}),
    "UniPC": (["unipc"], {"scheduler": "sgm_uniform"}),
    "LCM": (["k_lcm"], {}),
}


def test_table_is_a1111s_in_a1111s_order():
    assert [s.name for s in SAMPLERS] == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
        "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
    ]
    for name, (aliases, options) in A1111_OPTIONS.items():
        for key in (name, *aliases, name.upper()):
            assert find_sampler(key).name == name
        assert find_sampler(name).options == options


def test_api_lists_the_samplers_with_aliases_and_options(builtin_ctx):
    app = FastAPI()
    routes.install(app, builtin_ctx)
    listed = {s["name"]: s for s in TestClient(app).get("/sdapi/v1/samplers").json()}
    for name, (aliases, options) in A1111_OPTIONS.items():
        assert listed[name] == {"name": name, "aliases": aliases, "options": options}


# -- each sampler against its reference -----------------------------------------------------------


def test_dpmpp_2m_sde_heun_is_k_diffusions_heun_solver():
    sigmas = get_sigmas("Automatic", 10, DENOISER, find_sampler("DPM++ 2M SDE Heun"))
    x = image_noise([3, 4], (4, 8, 8)) * sigmas[0]
    expected = kd.sample_dpmpp_2m_sde(DENOISER, x, sigmas, extra_args=PLAIN, disable=True, solver_type="heun",
                                      noise_sampler=brownian_noise_sampler(x, sigmas, [3, 4]))
    heun = run_sampler(find_sampler("DPM++ 2M SDE Heun"), DENOISER, x, sigmas, extra_args=PLAIN, seeds=[3, 4])
    midpoint = run_sampler(find_sampler("DPM++ 2M SDE"), DENOISER, x, sigmas, extra_args=PLAIN, seeds=[3, 4])
    assert torch.equal(heun, expected)
    assert float((midpoint - heun).abs().max()) > 1e-3  # the solver type does reach k-diffusion


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_plms_is_diffusers_pndm_without_runge_kutta_steps(steps):
    # diffusers' PNDM with skip_prk_steps is CompVis' PLMS on DDIM's timesteps (1, 1 + 1000 // n, ...);
    # alpha_bar 1 after the last step is the schedule's final 0.
    scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    x = noise()
    for t in scheduler.timesteps:
        x = scheduler.step(mixture_eps(x, t.view(1).float()), t, x).prev_sample
    sigmas = get_sigmas("Automatic", steps, DENOISER, find_sampler("PLMS"))
    assert torch.equal(sigmas[:-1], DENOISER.sigmas[scheduler.timesteps.unique().flip(0)])
    out = run_sampler(find_sampler("PLMS"), DENOISER, to_kd(noise(), sigmas[0]), sigmas, extra_args=PLAIN, seeds=[0])
    assert relative(out, x) < 1e-5


@pytest.mark.parametrize("steps", [5, 10])
def test_unipc_is_diffusers_unipc_with_a1111s_settings(steps):
    # A1111's UniPC: B(h) = h ("bh1"), order 3, lower orders at the end, timesteps evenly spaced
    # from 999 to 0 and stopping at the lowest level, as diffusers' "linspace" and "sigma_min" do.
    scheduler = UniPCMultistepScheduler(**SD_BETAS, solver_order=3, solver_type="bh1", lower_order_final=True,
                                        timestep_spacing="linspace", final_sigmas_type="sigma_min")
    scheduler.set_timesteps(steps)
    x = noise()
    for t in scheduler.timesteps:
        x = scheduler.step(mixture_eps(x, t.view(1).float()), t, x).prev_sample
    sigmas = scheduler.sigmas
    out = run_sampler(find_sampler("UniPC"), DENOISER, to_kd(noise(), sigmas[0]), sigmas, extra_args=PLAIN, seeds=[0])
    assert relative(out, to_kd(x, sigmas[-1])) < 1e-5
    # A first-order solver on the same levels (DPM-Solver++ 1 = DDIM) is well away from it.
    ddim = run_sampler(find_sampler("DDIM"), DENOISER, to_kd(noise(), sigmas[0]), sigmas, extra_args=PLAIN, seeds=[0])
    assert relative(ddim, to_kd(x, sigmas[-1])) > 1e-3
    # The Automatic schedule is that grid (unrounded), ending at 0 instead of the lowest level.
    automatic = get_sigmas("Automatic", steps, DENOISER, find_sampler("UniPC"))
    torch.testing.assert_close(automatic[:-1], sigmas[:-1], rtol=2e-3, atol=0)
    assert automatic[-1] == 0


def test_unipc_step_to_zero_is_the_models_estimate():
    sigmas = get_sigmas("Automatic", 6, DENOISER, find_sampler("UniPC"))
    seen = []
    out = run_sampler(find_sampler("UniPC"), DENOISER, to_kd(noise(), sigmas[0]), sigmas, extra_args=PLAIN, seeds=[0],
                      callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(out, seen[-1]["denoised"])


def test_lcm_is_diffusers_lcm_scheduler():
    # The same draws for the noise each step adds. diffusers' boundary-condition scalings at these
    # timesteps are 1 within 1e-7, the tolerance's share of the difference.
    scheduler = LCMScheduler(**SD_BETAS)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    draws = torch.Generator().manual_seed(5)
    x = noise()
    for t in scheduler.timesteps:
        x = scheduler.step(mixture_eps(x, t.view(1).float()), t, x, generator=draws).prev_sample
    sigmas = torch.cat([DENOISER.sigmas[scheduler.timesteps], torch.zeros(1)])
    same_draws = torch.Generator().manual_seed(5)
    out = find_sampler("LCM").fn(DENOISER, to_kd(noise(), sigmas[0]), sigmas, extra_args=PLAIN, disable=True,
                                 noise_sampler=lambda a, b: torch.randn(x.shape, generator=same_draws))
    assert relative(out, x) < 1e-5


def test_lcm_noise_continues_each_image_stream_without_the_seed_delta():
    # A1111 draws LCM's and Restart's noise from the image's generator after its starting noise
    # and does not mark them as using "eta noise seed delta" (the Restart test above draws so too).
    # LCM: x = target + sigma_next * noise after a step.
    target = torch.full((2, 4, 4), 0.5)
    sigmas = torch.tensor([8.0, 2.0, 0.0])
    seen = []
    run_sampler(find_sampler("LCM"), lambda x, sigma: target.expand_as(x).clone(), image_noise([5, 6], (2, 4, 4)) * 8,
                sigmas, seeds=[5, 6], noise_seed_delta=31337, callback=seen.append)
    stream = torch.Generator().manual_seed(6)
    torch.randn((2, 4, 4), generator=stream)
    torch.testing.assert_close(seen[1]["x"][1], target + 2.0 * torch.randn((2, 4, 4), generator=stream))
    for name in ("LCM", "Restart"):
        assert find_sampler(name).noise == "stream" and "uses_ensd" not in find_sampler(name).options


def cfg_conditioning(steps, cond_shift, uncond_shift):
    def context(shift):
        return ScheduledCond([(steps, torch.full((3, 4), shift))])

    return Conditioning(cond=[[(context(cond_shift), 1.0)]], uncond=[context(uncond_shift)])


@pytest.mark.parametrize("cfg_scale", [7.0, 12.5])
def test_ddim_cfgpp_follows_the_papers_update(cfg_scale):
    # CFG++ (A1111's ddim_cfgpp): guidance lambda = CFG scale / 12.5; x0 from the guided noise,
    # the step back along the negative prompt's. At 12.5 (lambda 1) guidance alone would not run
    # the negative prompt at all.
    steps, cond, uncond = 8, 0.4, -0.3
    timesteps = torch.arange(steps) * (1000 // steps) + 1
    lam = cfg_scale / 12.5
    x = noise(1)
    for k in reversed(range(steps)):
        t = timesteps[k].view(1).float()
        alpha = ALPHAS[timesteps[k]]
        alpha_next = ALPHAS[timesteps[k - 1]] if k > 0 else torch.tensor(1.0)
        eps_cond, eps_uncond = mixture_eps(x, t, cond), mixture_eps(x, t, uncond)
        x0 = (x - (1 - alpha).sqrt() * (eps_uncond + lam * (eps_cond - eps_uncond))) / alpha.sqrt()
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps_uncond

    sigmas = get_sigmas("Automatic", steps, DENOISER, find_sampler("DDIM CFG++"))
    guided = CFGDenoiser(DENOISER)
    args = {"conditioning": cfg_conditioning(steps, cond, uncond), "cond_scale": cfg_scale}
    out = run_sampler(find_sampler("DDIM CFG++"), guided, to_kd(noise(1), sigmas[0]), sigmas, extra_args=args, seeds=[0])
    assert relative(out, x) < 1e-5
    assert guided.report_uncond is False  # only for the run
    ddim = run_sampler(find_sampler("DDIM"), guided, to_kd(noise(1), sigmas[0]), sigmas,
                       extra_args={**args, "cond_scale": lam}, seeds=[0])
    assert relative(ddim, x) > 1e-3  # plain DDIM at the same guidance steps along the guided noise


def test_denoiser_reports_the_negative_prompts_estimate_masked_as_the_result():
    guided = CFGDenoiser(DENOISER)
    args = {"conditioning": cfg_conditioning(1, 0.4, -0.3), "cond_scale": 1.0}
    x, sigma = to_kd(noise(2), 3.0), torch.tensor([3.0])
    guided(x, sigma, **args)
    assert guided.uncond_denoised is None  # not asked: scale 1 runs the prompt alone
    guided.report_uncond = True
    keep, init = (torch.arange(8) < 4).float().view(1, 1, 1, 8), torch.full((1, 4, 8, 8), 9.0)
    denoised = guided(x, sigma, **args, init_latent=init, keep=keep)
    expected = DENOISER(x, sigma, context=torch.full((1, 3, 4), -0.3))
    torch.testing.assert_close(guided.uncond_denoised[..., 4:], expected[..., 4:])
    assert torch.equal(guided.uncond_denoised[..., :4], init[..., :4]) and torch.equal(denoised[..., :4], init[..., :4])


def heun(denoise, x, levels):
    """Karras et al.'s Algorithm 1 (Heun, Euler on a step to 0), written out."""
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        slope = (x - denoise(x, sigma)) / sigma
        ahead = x + (sigma_next - sigma) * slope
        if sigma_next > 0:
            ahead = x + (sigma_next - sigma) * (slope + (ahead - denoise(ahead, sigma_next)) / sigma_next) / 2
        x = ahead
    return x


@pytest.mark.parametrize("steps, span, repeats", [(20, 9, 1), (40, 10, 2)])
def test_restart_is_the_papers_algorithm_with_a1111s_settings(steps, span, repeats):
    # Xu et al.'s Algorithm 1: an ODE solver down to t_min; K times, forward noise from t_min up to
    # t_max (sqrt(t_max^2 - t_min^2) of fresh noise) and the ODE down again; then on to 0. A1111:
    # t_min, t_max are the main Karras schedule's levels nearest 0.1 and 2; 20-35 steps restart
    # once over 9 steps, 36 and more twice over steps // 4; the main schedule has the rest.
    def denoise(x, sigma):
        return DENOISER(x, sigma.view(1), context=None)

    sigmas = get_sigmas("Automatic", steps, DENOISER, find_sampler("Restart"))
    main = kd.get_sigmas_karras(steps - span * repeats, float(sigmas[-2]), float(sigmas[0]))
    low, high = int((main - 0.1).abs().argmin()), int((main - 2).abs().argmin())
    stretch = kd.get_sigmas_karras(span + 1, float(main[low]), float(main[high]))[:-1]
    stream = torch.Generator().manual_seed(7)
    start = torch.randn((4, 8, 8), generator=stream)[None] * sigmas[0]
    x = heun(denoise, start, main[: low + 1])
    for _ in range(repeats):
        x = x + torch.randn((4, 8, 8), generator=stream)[None] * (main[high] ** 2 - main[low] ** 2) ** 0.5
        x = heun(denoise, x, stretch)
    x = heun(denoise, x, main[low:])

    seen = []
    out = run_sampler(find_sampler("Restart"), DENOISER, start, sigmas, extra_args=PLAIN, seeds=[7], callback=seen.append)
    assert relative(out, x) < 1e-5
    assert [d["i"] for d in seen] == list(range(steps))  # as many steps as asked for
    visited = [*main[:low], *stretch[:-1].tolist() * repeats, *main[low:-1]]
    assert [float(d["sigma"]) for d in seen] == pytest.approx([float(s) for s in visited], rel=1e-6)
    assert 0.05 < float(main[low]) < 0.2 and 1.5 < float(main[high]) < 3


def test_restart_under_20_steps_is_heun():
    sigmas = get_sigmas("Automatic", 12, DENOISER, find_sampler("Restart"))
    x = to_kd(noise(), sigmas[0])
    expected = kd.sample_heun(DENOISER, x, sigmas, extra_args=PLAIN, disable=True)
    assert torch.equal(run_sampler(find_sampler("Restart"), DENOISER, x, sigmas, extra_args=PLAIN, seeds=[0]), expected)


# -- through the pipeline on the built-in model ---------------------------------------------------

SCENE = "a large red circle in the top left corner on a blue background"


@pytest.mark.parametrize("name, steps", [
    # SDE solvers need more steps than 8 for a clean picture of this model, PLMS at CFG 7 too
    # (diffusers' PNDM gives the same burnt picture at 8).
    ("DPM++ 2M SDE Heun", 20), ("Restart", 20), ("DDIM CFG++", 8), ("PLMS", 20), ("UniPC", 8), ("LCM", 8),
])
def test_each_new_sampler_draws_the_scene_on_the_builtin_model(builtin_ctx, name, steps):
    request = GenerationRequest(prompt=SCENE, sampler_name=name, steps=steps, seed=1, width=64, height=64, cfg_scale=7.0)
    result = pipeline.generate(builtin_ctx, request, save=False)
    assert f"Sampler: {name}," in result.infotexts[0]
    pixels = np.asarray(result.images[0].convert("RGB")).astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    warm = (red > blue + 60) & (red > 120)  # the circle (PLMS draws it orange)
    sky = (blue > red + 100) & (blue > green + 100)  # the background
    assert 0.05 < warm.mean() < 0.5 and sky.mean() > 0.4, (warm.mean(), sky.mean())
    assert warm[:32, :32].mean() > 3 * warm[32:, 32:].mean()  # top left, as asked
