"""Samplers, schedules, seeded noise and classifier-free guidance, without a real model: analytic
denoisers whose right answer is known, a recording fake for the CFG arithmetic, and the tiny SD
model for the whole path through SDModel.apply_model."""

from __future__ import annotations

import pytest
import torch

from modules.models.sd_model import DIFFUSION_TARGETS, diffusion_target, scaled_linear_alphas_cumprod
from modules.prompting.conditioning import Conditioning, ScheduledCond
from modules.sampling.denoiser import CFGDenoiser, EpsDenoiser, VDenoiser, model_denoiser
from modules.sampling.noise import ImageNoise, ancestral_noise_sampler, brownian_noise_sampler, image_noise
from modules.sampling.registry import (
    SAMPLERS,
    find_sampler,
    find_sampler_and_schedule,
    run_sampler,
)
from modules.sampling.schedules import SCHEDULES, find_schedule, get_sigmas
from tests.tiny import tiny_sd_model

SAMPLER_NAMES = [s.name for s in SAMPLERS]
SCHEDULE_NAMES = [s.label for s in SCHEDULES]
STOCHASTIC = ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"]
CONTEXT_DIM = 32  # the tiny model's CLIP width


class _FakeModel:
    """Only SD 1.x's noise table; schedules read the denoiser's sigmas and must never call the model."""

    alphas_cumprod = scaled_linear_alphas_cumprod()
    prediction = "eps"

    def apply_model(self, x, t, context, c_concat=None):
        raise AssertionError("schedules must not call the model")


@pytest.fixture(scope="module")
def sd_sigmas():
    return EpsDenoiser(_FakeModel())


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_model(seed=0)


def sigmas_for(name, steps, denoiser, schedule="Automatic"):
    return get_sigmas(schedule, steps, denoiser, find_sampler(name))


# -- the table ------------------------------------------------------------------------------------


def test_table_has_a1111_samplers_in_a1111_order():
    assert SAMPLER_NAMES == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
        "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
    ]
    for sampler in SAMPLERS:  # no name or alias is shared by two samplers
        for key in (sampler.name, *sampler.aliases):
            assert find_sampler(key) is sampler


@pytest.mark.parametrize(
    "alias, name",
    [
        ("k_euler", "Euler"), ("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"), ("k_lms", "LMS"),
        ("k_heun", "Heun"), ("k_dpm_2", "DPM2"), ("k_dpm_2_a", "DPM2 a"), ("k_dpmpp_2s_a", "DPM++ 2S a"),
        ("k_dpmpp_2m", "DPM++ 2M"), ("k_dpmpp_sde", "DPM++ SDE"), ("k_dpmpp_2m_sde", "DPM++ 2M SDE"),
        ("k_dpmpp_3m_sde", "DPM++ 3M SDE"), ("k_dpm_fast", "DPM fast"), ("k_dpm_ad", "DPM adaptive"),
        ("ddim", "DDIM"), ("euler A", "Euler a"), ("  dpm++ 2m sde ", "DPM++ 2M SDE"), ("K_EULER", "Euler"),
    ],
)
def test_find_sampler_by_alias_any_case(alias, name):
    assert find_sampler(alias).name == name


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        find_sampler("Euler b")
    message = str(e.value)
    assert "'Euler b'" in message
    for name in SAMPLER_NAMES:
        assert name in message


def test_a1111_facts():
    karras = {s.name for s in SAMPLERS if s.default_schedule == "karras"}
    assert karras == {"DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a", "Restart"}
    exponential = {s.name for s in SAMPLERS if s.default_schedule == "exponential"}
    assert exponential == {"DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    assert {s.name for s in SAMPLERS if s.brownian} == {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    assert {s.name for s in SAMPLERS if s.ancestral} == {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive"}
    assert {s.name for s in SAMPLERS if s.second_order} == {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
    assert {s.name for s in SAMPLERS if s.default_schedule == "ddim"} == {"DDIM", "DDIM CFG++", "PLMS"}
    assert find_sampler("DPM++ 2M").options == {"scheduler": "karras"}
    assert find_sampler("DPM++ SDE").options == {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}
    for sampler in SAMPLERS:
        find_schedule(sampler.default_schedule)


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("Euler a", "karras", ("Euler a", "Karras")),
        ("k_dpmpp_2m", "sgm_uniform", ("DPM++ 2M", "SGM Uniform")),
        ("DPM++ SDE", None, ("DPM++ SDE", "Automatic")),
    ],
)
def test_old_combined_names_split_into_sampler_and_schedule(sampler, schedule, expected):
    found_sampler, found_schedule = find_sampler_and_schedule(sampler, schedule)
    assert (found_sampler.name, found_schedule.label) == expected


# -- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_name, label", [
    ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("SGMUniform", "SGM Uniform"),
    ("ddim", "DDIM"), ("KARRAS", "Karras"), (None, "Automatic"), ("", "Automatic"),
])
def test_find_schedule(api_name, label):
    assert find_schedule(api_name).label == label


def test_unknown_schedule_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        find_schedule("linear")
    for label in SCHEDULE_NAMES:
        assert label in str(e.value)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 150])
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("sampler", ["Euler", "DPM2", "DPM++ 3M SDE", "DDIM"])
def test_schedule_shape(sd_sigmas, sampler, schedule, steps):
    sigmas = sigmas_for(sampler, steps, sd_sigmas, schedule)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
    assert sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1]), sigmas
    assert sigmas[0] <= sd_sigmas.sigma_max * (1 + 1e-5)
    assert sigmas[-2] >= sd_sigmas.sigma_min * (1 - 1e-5)


def test_karras_and_friends_span_the_model_range(sd_sigmas):
    sigma_min, sigma_max = float(sd_sigmas.sigma_min), float(sd_sigmas.sigma_max)
    assert sigma_min == pytest.approx(0.0292, abs=1e-4) and sigma_max == pytest.approx(14.6146, abs=1e-4)
    for schedule in ("Karras", "Exponential", "Polyexponential", "Uniform", "SGM Uniform"):
        sigmas = sigmas_for("Euler", 10, sd_sigmas, schedule)
        assert float(sigmas[0]) == pytest.approx(sigma_max, rel=1e-5), schedule
    for schedule in ("Karras", "Exponential", "Polyexponential", "Uniform"):
        sigmas = sigmas_for("Euler", 10, sd_sigmas, schedule)
        assert float(sigmas[-2]) == pytest.approx(sigma_min, rel=1e-5), schedule


def test_schedule_values(sd_sigmas):
    # Uniform is k-diffusion's own discretisation; Karras is rho = 7 between the model's ends.
    assert torch.equal(sigmas_for("Euler", 5, sd_sigmas), sd_sigmas.get_sigmas(5))
    karras = sigmas_for("Euler", 4, sd_sigmas, "Karras")
    lo, hi = float(sd_sigmas.sigma_min) ** (1 / 7), float(sd_sigmas.sigma_max) ** (1 / 7)
    expected = [(hi + k / 3 * (lo - hi)) ** 7 for k in range(4)] + [0.0]
    assert karras.tolist() == pytest.approx(expected, rel=1e-5)
    # DDIM: timesteps 951, 901, ..., 1 for 20 steps.
    ddim = sigmas_for("DDIM", 20, sd_sigmas)
    assert torch.equal(ddim[:-1], sd_sigmas.sigmas[torch.arange(951, 0, -50)])
    # SGM Uniform: n + 1 evenly spaced timesteps from 999 to 0, the last one dropped.
    sgm = sigmas_for("Euler", 4, sd_sigmas, "SGM Uniform")
    assert sgm[:-1].tolist() == pytest.approx(sd_sigmas.t_to_sigma(torch.tensor([999.0, 749.25, 499.5, 249.75])).tolist())


def test_automatic_is_the_sampler_default_and_penultimate_sigma_is_dropped(sd_sigmas):
    assert torch.equal(sigmas_for("DPM++ 2M", 10, sd_sigmas), sigmas_for("DPM++ 2M", 10, sd_sigmas, "Karras"))
    assert torch.equal(sigmas_for("DPM++ 2M SDE", 10, sd_sigmas), sigmas_for("DPM++ 2M SDE", 10, sd_sigmas, "exponential"))
    # DPM2 takes 11 Karras levels and drops the next-to-last one, as A1111 does.
    eleven = sigmas_for("Euler", 11, sd_sigmas, "Karras")
    assert torch.equal(sigmas_for("DPM2", 10, sd_sigmas), torch.cat([eleven[:-2], eleven[-1:]]))
    assert get_sigmas("Automatic", 10, sd_sigmas).tolist() == sigmas_for("Euler", 10, sd_sigmas).tolist()


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_count(sd_sigmas, steps):
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("Karras", steps, sd_sigmas)


# -- noise ----------------------------------------------------------------------------------------


def test_image_noise_is_a1111_cpu_noise():
    noise = image_noise([7, 1234], (4, 8, 6))
    assert noise.shape == (2, 4, 8, 6) and noise.dtype == torch.float32
    assert torch.equal(noise[1], torch.randn((4, 8, 6), generator=torch.Generator().manual_seed(1234)))
    assert torch.equal(image_noise([1234], (4, 8, 6), source="CPU")[0], noise[1])


def test_noise_source_names():
    assert image_noise([3], (2, 2), source="GPU", device="cpu").shape == (1, 2, 2)  # falls back to the CPU here
    with pytest.raises(ValueError, match="CPU, GPU"):
        image_noise([3], (2, 2), source="NV")


def test_ancestral_noise_continues_each_image_stream():
    x = torch.zeros(3, 2, 4, 4)
    draw = ancestral_noise_sampler(x, [5, 6, 7], "cpu")
    first, second = draw(1.0, 0.5), draw(0.5, 0.1)
    g = torch.Generator().manual_seed(6)
    torch.randn((2, 4, 4), generator=g)  # the starting noise
    assert torch.equal(first[1], torch.randn((2, 4, 4), generator=g))
    assert torch.equal(second[1], torch.randn((2, 4, 4), generator=g))
    # With a seed delta the stream starts afresh from seed + delta.
    shifted = ancestral_noise_sampler(x, [5, 6, 7], "cpu", seed_delta=31337)(1.0, 0.5)
    assert torch.equal(shifted[2], ImageNoise([7 + 31337], (2, 4, 4)).draw()[0])


def test_brownian_noise_is_per_image():
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.1, 0.0])
    batch = brownian_noise_sampler(torch.zeros(3, 2, 4, 4), sigmas, [5, 6, 7])
    alone = brownian_noise_sampler(torch.zeros(1, 2, 4, 4), sigmas, [6])
    for a, b in ((10.0, 3.0), (3.0, 1.0), (1.0, 0.1)):
        assert torch.equal(batch(torch.tensor(a), torch.tensor(b))[1], alone(torch.tensor(a), torch.tensor(b))[0])
    noise = batch(torch.tensor(3.0), torch.tensor(1.0))
    assert noise.dtype == torch.float32 and 0.5 < float(noise.std()) < 1.5


# -- samplers on analytic denoisers ---------------------------------------------------------------


def fixed_point_denoiser(target):
    """All data is `target`, so the ideal denoiser returns it whatever the input."""
    return lambda x, sigma, **kwargs: target.expand_as(x).clone()


def gaussian_denoiser(mean, std):
    """Data ~ N(mean, std^2) per element: the ideal denoiser is the posterior mean."""

    def denoise(x, sigma, **kwargs):
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return (std**2 * x + s2 * mean) / (std**2 + s2)

    return denoise


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_samplers_reach_the_only_image(sd_sigmas, name):
    info = find_sampler(name)
    target = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = sigmas_for(name, 6, sd_sigmas)
    x = image_noise([1, 2], (4, 8, 8)) * sigmas[0]
    out = run_sampler(info, fixed_point_denoiser(target), x, sigmas, seeds=[1, 2])
    if info.own_levels:
        # DPM fast / adaptive stop at sigma_min, with its share of (ancestral) noise left in.
        assert float((out - target).std()) < 2 * float(sd_sigmas.sigma_min)
    else:
        torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [s.name for s in SAMPLERS if not s.own_levels])  # those need 2 levels
def test_one_step_is_a_plain_denoise(sd_sigmas, name):
    """A one-step schedule goes straight to 0; k-diffusion's DPM++ 2M SDE and 3M SDE fail on it
    by themselves."""
    target = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = sigmas_for(name, 1, sd_sigmas)
    x = image_noise([1], (4, 8, 8)) * sigmas[0]
    out = run_sampler(find_sampler(name), fixed_point_denoiser(target), x, sigmas, seeds=[1])
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)


# LCM assumes a consistency model, which maps a level to a sample: with the ideal denoiser's
# posterior mean, the fresh noise of each step does not restore the spread the mean removed.
@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n != "LCM"])
def test_samplers_draw_from_the_data_distribution(sd_sigmas, name):
    info = find_sampler(name)
    sigmas = sigmas_for(name, 40, sd_sigmas)
    x = image_noise([1, 2], (4, 32, 32)) * sigmas[0]
    out = run_sampler(info, gaussian_denoiser(0.5, 0.3), x, sigmas, seeds=[1, 2])
    assert float(out.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(out.std()) == pytest.approx(0.3, rel=0.25)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_callback_steps_and_interrupt(sd_sigmas, name):
    info = find_sampler(name)
    sigmas = sigmas_for(name, 8, sd_sigmas)
    x = image_noise([1], (4, 8, 8)) * sigmas[0]
    seen = []
    run_sampler(info, gaussian_denoiser(0.0, 1.0), x, sigmas, seeds=[1], callback=lambda d: seen.append(d["i"]))
    assert seen and seen == sorted(seen) and 0 <= seen[0] and seen[-1] <= 7
    if not info.own_levels:
        assert seen == list(range(8))

    class Stop(Exception):
        pass

    def stop_at_two(d):
        if d["i"] >= 2:
            raise Stop(d["denoised"])

    with pytest.raises(Stop):
        run_sampler(info, gaussian_denoiser(0.0, 1.0), x, sigmas, seeds=[1], callback=stop_at_two)


def test_ddim_is_deterministic_ddim():
    # One DDIM step from x at sigma to sigma_next keeps the predicted noise: x0 + sigma_next * eps.
    info = find_sampler("DDIM")
    sigmas = torch.tensor([8.0, 2.0, 0.0])
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    target = torch.full((2, 3, 3), 0.25)
    steps = []
    run_sampler(info, fixed_point_denoiser(target), x, sigmas, seeds=[0], callback=lambda d: steps.append(d))
    eps = (x - target) / 8.0
    torch.testing.assert_close(steps[1]["x"], target + 2.0 * eps)


def test_run_sampler_checks_seeds(sd_sigmas):
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        run_sampler(find_sampler("Euler a"), gaussian_denoiser(0, 1), torch.zeros(3, 4, 8, 8), sigmas_for("Euler", 3, sd_sigmas), seeds=[1, 2])


# -- classifier-free guidance ---------------------------------------------------------------------


class RecordingModel:
    """A fake model denoiser: output = x + the context's first value, so every row's output shows
    which conditioning it got; records each call's batch size."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, *, context, c_concat=None):
        self.calls.append(x.shape[0])
        out = x + context[:, 0, 0].view(-1, 1, 1, 1)
        if c_concat is not None:
            out = out + c_concat.mean(dim=1, keepdim=True)
        return out


def const(value, tokens=3):
    return torch.full((tokens, 4), float(value))


def scheduled(*entries):
    """ScheduledCond from (end_at_step, value) pairs."""
    return ScheduledCond([(end, const(value)) for end, value in entries])


def test_cfg_scale_one_is_the_prompt_alone_in_one_pass():
    model = RecordingModel()
    cfg = CFGDenoiser(model)
    conditioning = Conditioning(cond=[[(scheduled((10, 3.0)), 1.0)]], uncond=[scheduled((10, -1.0))])
    x = torch.zeros(1, 4, 2, 2)
    out = cfg(x, torch.ones(1), conditioning=conditioning, cond_scale=1.0)
    torch.testing.assert_close(out, torch.full_like(x, 3.0))
    assert model.calls == [1]  # the negative prompt cancels out at scale 1


def test_cfg_combines_composable_parts_per_image_in_one_batch():
    model = RecordingModel()
    cfg = CFGDenoiser(model)
    conditioning = Conditioning(
        cond=[
            [(scheduled((10, 2.0)), 1.0)],
            [(scheduled((10, 4.0)), 0.5), (scheduled((10, 10.0)), 0.25), (scheduled((10, 6.0)), -0.5)],
        ],
        uncond=[scheduled((10, 1.0)), scheduled((10, 0.0))],
    )
    x = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)])
    out = cfg(x, torch.ones(2), conditioning=conditioning, cond_scale=7.0)
    assert model.calls == [6]  # 1 + 3 prompt parts and 2 negative prompts, one model call
    first = 1.0 + 7.0 * (2.0 - 1.0)
    u = 1.0
    second = u + 7.0 * (0.5 * (5.0 - u) + 0.25 * (11.0 - u) - 0.5 * (7.0 - u))
    torch.testing.assert_close(out[0], torch.full((4, 2, 2), first))
    torch.testing.assert_close(out[1], torch.full((4, 2, 2), second))

    # Scale 1 with weights that do not sum to 1 still needs the negative prompt.
    model.calls.clear()
    out = cfg(x, torch.ones(2), conditioning=conditioning, cond_scale=1.0)
    assert model.calls == [6]
    torch.testing.assert_close(out[1], torch.full((4, 2, 2), u + 0.5 * (5.0 - u) + 0.25 * (11.0 - u) - 0.5 * (7.0 - u)))


def test_cfg_max_batch_and_mixed_lengths_give_the_same_result():
    conditioning = Conditioning(
        cond=[[(scheduled((10, 2.0)), 1.0)], [(scheduled((10, 3.0)), 1.0)], [(ScheduledCond([(10, const(5.0, tokens=6))]), 1.0)]],
        uncond=[scheduled((10, 1.0)), scheduled((10, 0.0)), scheduled((10, -2.0))],
    )
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    whole, split = RecordingModel(), RecordingModel()
    a = CFGDenoiser(whole)(x, torch.ones(3), conditioning=conditioning, cond_scale=5.0)
    b = CFGDenoiser(split, max_batch=2)(x, torch.ones(3), conditioning=conditioning, cond_scale=5.0)
    torch.testing.assert_close(a, b)
    assert whole.calls == [5, 1]  # the longer prompt cannot share a batch with the others
    assert split.calls == [2, 2, 1, 1]


def test_cfg_passes_c_concat_per_row():
    model = RecordingModel()
    conditioning = Conditioning(cond=[[(scheduled((10, 0.0)), 1.0)], [(scheduled((10, 0.0)), 1.0)]],
                                uncond=[scheduled((10, 0.0)), scheduled((10, 0.0))])
    c_concat = torch.stack([torch.full((5, 2, 2), 1.0), torch.full((5, 2, 2), 2.0)])
    out = CFGDenoiser(model)(torch.zeros(2, 4, 2, 2), torch.ones(2), conditioning=conditioning, cond_scale=3.0, c_concat=c_concat)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([1.0, 2.0]))


def test_cfg_rejects_a_mismatched_batch():
    conditioning = Conditioning(cond=[[(scheduled((10, 0.0)), 1.0)]], uncond=[scheduled((10, 0.0))])
    with pytest.raises(ValueError, match="batch has 2 images"):
        CFGDenoiser(RecordingModel())(torch.zeros(2, 4, 2, 2), torch.ones(2), conditioning=conditioning, cond_scale=7.0)


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM fast"])
def test_step_counter_switches_prompt_editing_stages(sd_sigmas, name):
    # Prompt "[a:b:3]" over 6 steps: a for steps 0..3, b from step 4 on.
    model = RecordingModel()
    cfg = CFGDenoiser(model)
    contexts = []

    def spy(x, sigma, *, context, c_concat=None):
        contexts.append((cfg.step, float(context[0, 0, 0])))
        return model(x, sigma, context=context)

    cfg.inner_model = spy
    conditioning = Conditioning(cond=[[(scheduled((3, 1.0), (6, 2.0)), 1.0)]], uncond=[scheduled((6, 0.0))])
    sigmas = sigmas_for(name, 6, sd_sigmas)
    steps_seen = []
    run_sampler(find_sampler(name), cfg, torch.zeros(1, 4, 2, 2), sigmas, seeds=[0],
                extra_args={"conditioning": conditioning, "cond_scale": 7.0},
                callback=lambda d: steps_seen.append((d["i"], cfg.step)))
    assert all(step == i + 1 for i, step in steps_seen)
    for step, value in contexts:
        if value != 0.0:  # the prompt's rows (the negative prompt has one stage)
            assert value == (1.0 if step <= 3 else 2.0)
    assert {v for s, v in contexts if v} == {1.0, 2.0}


# -- the tiny SD model --------------------------------------------------------------------------


def tiny_conditioning(seeds, steps=10):
    """A different prompt per image, made from the image's seed, so batches can be compared."""
    def tensor(seed):
        return torch.randn(77, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))

    return Conditioning(
        cond=[[(ScheduledCond([(steps, tensor(1000 + s))]), 1.0)] for s in seeds],
        uncond=[ScheduledCond([(steps, tensor(5))]) for _ in seeds],
    )


def generate(model, name, seeds, steps=3, schedule="Automatic", source="cpu", device="cpu"):
    denoiser = model_denoiser(model)
    info = find_sampler(name)
    sigmas = get_sigmas(schedule, steps, denoiser, info).to(device)
    x = image_noise(seeds, (4, 8, 8), source=source, device=device) * sigmas[0]
    cfg = CFGDenoiser(denoiser)
    with torch.no_grad():
        return run_sampler(info, cfg, x, sigmas, seeds=seeds, noise_source=source,
                           extra_args={"conditioning": tiny_conditioning(seeds, steps), "cond_scale": 5.0})


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_runs_the_tiny_model(tiny, name):
    out = generate(tiny, name, [11, 12])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_image_and_batch_independence(tiny, name):
    batch = generate(tiny, name, [100, 101, 102])
    again = generate(tiny, name, [100, 101, 102])
    alone = generate(tiny, name, [101])
    assert torch.equal(batch, again)
    # Equal up to the UNet's float rounding, which depends on the batch size; noise shared
    # across the batch would differ by about the size of the latents.
    torch.testing.assert_close(batch[1], alone[0], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(batch[0], batch[1], atol=0.1)


@pytest.mark.parametrize("name", STOCHASTIC + ["DPM2 a", "DPM++ 2S a", "DPM++ 3M SDE", "DPM fast", "DPM adaptive"])
def test_batch_never_changes_an_image_exactly(sd_sigmas, name):
    # With a denoiser that treats rows independently, the image is bit for bit the same.
    info = find_sampler(name)
    sigmas = sigmas_for(name, 6, sd_sigmas)

    def sample(seeds):
        x = image_noise(seeds, (4, 8, 8)) * sigmas[0]
        return run_sampler(info, gaussian_denoiser(0.5, 0.3), x, sigmas, seeds=seeds)

    batch, alone = sample([100, 101, 102]), sample([101])
    if name == "DPM adaptive":
        # Its step size control measures the error over the whole batch, so the levels it
        # visits (not the noise) depend on the batch; the result stays close.
        torch.testing.assert_close(batch[1], alone[0], atol=0.1, rtol=0)
    else:
        assert torch.equal(batch[1], alone[0])
    assert torch.equal(sample([100, 101, 102]), batch)


def test_model_denoiser_wraps_apply_model(tiny):
    denoiser = model_denoiser(tiny)
    assert isinstance(denoiser, EpsDenoiser)
    assert list(denoiser.children()) == []  # the SD model is not a submodule: .to() moves only the tables
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.randn(1, 77, CONTEXT_DIM, generator=torch.Generator().manual_seed(4))
    sigma = denoiser.sigmas[500:501]
    with torch.no_grad():
        expected = x - sigma * tiny.apply_model(x / (sigma**2 + 1) ** 0.5, torch.tensor([500.0]), context)
        torch.testing.assert_close(denoiser(x, sigma, context=context), expected)
    assert isinstance(model_denoiser(tiny_sd_model(seed=1, prediction="v")), VDenoiser)


@pytest.mark.parametrize("prediction", sorted(DIFFUSION_TARGETS))
def test_a_model_that_predicts_its_training_target_gives_the_sampler_the_clean_latents(prediction):
    """Training (diffusion_target) and sampling (model_denoiser) read the UNet's output the same way."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alphas = scaled_linear_alphas_cumprod()

    class Perfect:
        alphas_cumprod = alphas

        def apply_model(self, x, t, context=None, c_concat=None):
            return diffusion_target(prediction, x0, noise, alphas[t.round().long()].view(-1, 1, 1, 1))

    model = Perfect()
    model.prediction = prediction
    denoiser = model_denoiser(model)
    sigma = denoiser.sigmas[[300, 900]]
    denoised = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, context=None)
    torch.testing.assert_close(denoised, x0, atol=1e-4, rtol=1e-4)


def test_unknown_prediction_type():
    model = _FakeModel()
    model.prediction = "flow"
    with pytest.raises(ValueError, match="'flow'"):
        model_denoiser(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", STOCHASTIC)
def test_cpu_noise_gives_the_same_image_on_the_gpu(name):
    cpu_noise = image_noise([5, 6], (4, 8, 8))
    assert torch.equal(image_noise([5, 6], (4, 8, 8), source="CPU", device="cuda").cpu(), cpu_noise)
    gpu_noise = image_noise([5], (4, 8, 8), source="GPU", device="cuda")
    g = torch.Generator("cuda").manual_seed(5)
    assert torch.equal(gpu_noise[0], torch.randn((4, 8, 8), generator=g, device="cuda"))
    # The denoiser's sigma tables start on the CPU and follow the latents to the GPU; the
    # Brownian trees of the CPU source stay on the CPU, so the picture matches the CPU run.
    on_cpu = generate(tiny_sd_model(seed=0), name, [7, 8])
    # cuDNN's default TF32 convolutions keep 10 mantissa bits, which this random model amplifies
    # to 0.08 over three steps (as weights rounded so on the CPU show); the noise is compared here.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_gpu = generate(tiny_sd_model(seed=0).to("cuda"), name, [7, 8], device="cuda")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-2, rtol=1e-2)


def test_cfg_builds_its_row_indices_once_per_run_not_per_step(tiny, monkeypatch):
    """A tensor made from a list is, on a GPU, a copy that waits for the device: made at every
    step it would stall the GPU between steps."""
    made = []
    tensor = torch.tensor

    def counted(*args, **kwargs):
        made.append(args)
        return tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted)
    counts = {}
    for steps in (3, 9):
        made.clear()
        generate(tiny, "Euler", [11, 12], steps=steps)
        counts[steps] = len(made)
    assert counts[3] == counts[9]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_guided_step_on_the_gpu_never_waits_for_the_device():
    model = tiny_sd_model(seed=0).to("cuda")
    cfg = CFGDenoiser(model_denoiser(model))
    conditioning = tiny_conditioning([1, 2])
    conditioning = Conditioning(
        cond=[[(ScheduledCond([(10, c.at(0).cuda())]), w) for c, w in parts] for parts in conditioning.cond],
        uncond=[ScheduledCond([(10, u.at(0).cuda())]) for u in conditioning.uncond],
    )
    x, sigma = torch.randn(2, 4, 8, 8, device="cuda"), torch.full((2,), 3.0, device="cuda")
    with torch.no_grad():
        cfg(x, sigma, conditioning=conditioning, cond_scale=7.0)  # the first step makes the indices
        torch.cuda.set_sync_debug_mode("error")
        try:
            cfg(x, sigma, conditioning=conditioning, cond_scale=7.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
