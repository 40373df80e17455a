"""The samplers k-diffusion does not have, written in its form: x = x0 + sigma * eps, a denoiser
D(x, sigma) -> x0 estimate, decreasing levels `sigmas` ending in 0, and k-diffusion's signature
(model, x, sigmas, extra_args, callback, disable, ...) with its callback dict once per step.

A1111 runs DDIM, DDIM CFG++, PLMS and UniPC on the eps model at discrete timesteps. Dividing
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps by sqrt(alpha_bar) gives this form with
sigma = sqrt((1 - alpha_bar) / alpha_bar), and each of their updates carries over term for term,
so on the same levels these give the same numbers.
"""

from __future__ import annotations

import math

import torch
from k_diffusion import sampling as kd
from tqdm.auto import trange


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None):
    """DDIM (Song et al., 2020).

    DDIM predicts x0 and eps, then re-noises x0 to the next level along the predicted eps:
    x_next = x0 + sigma_next * eps (deterministic for eta = 0). With eta > 0 part of sigma_next
    comes from fresh noise instead; DDIM's sigma_t, divided by sqrt(alpha_bar), is exactly
    k-diffusion's ancestral `sigma_up`, so get_ancestral_step gives the split.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = kd.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = kd.get_ancestral_step(sigma, sigma_next, eta=eta)
        x = denoised + eps * sigma_down
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_ddim_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond_denoised=None):
    """DDIM with CFG++ (Chung et al., 2024): the guided estimate gives x0, but the step re-noises
    it along the negative prompt's own noise estimate, x_next = x0 + sigma_next * eps_uncond, which
    keeps the path on the data manifold at guidance lambda in [0, 1] (the registry maps A1111's
    CFG scale onto it). `uncond_denoised()` gives the last model call's unguided estimate; where
    it gives None (no negative prompt) the two estimates agree and this is DDIM."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        uncond = uncond_denoised() if uncond_denoised is not None else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = denoised + (x - (denoised if uncond is None else uncond)) * (sigma_next / sigma)
    return x


# Adams-Bashforth weights for the newest noise estimate first, by how many there are.
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """PLMS (Liu et al., 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as
    CompVis and A1111 run it: DDIM's transfer x_next = x + (sigma_next - sigma) * eps with eps an
    Adams-Bashforth combination of the last four steps' noise estimates. The first step has no
    history and is a pseudo improved Euler step instead (a DDIM step, the noise estimate there,
    the mean of both), which costs one model call more; only the first estimate of each step
    enters the history. The weights take the steps as equal, which DDIM's timesteps are."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []  # noise estimates, newest first
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        history.insert(0, (x - denoised) / sigma)
        del history[4:]
        if len(history) == 1 and sigma_next > 0:
            ahead = x + (sigma_next - sigma) * history[0]
            eps = (history[0] + (ahead - model(ahead, sigma_next * s_in, **extra_args)) / sigma_next) / 2
        else:
            eps = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(history)], history))
        x = x + (sigma_next - sigma) * eps
    return x


def _unipc_weights(h: float, rks: list[float]) -> tuple[float, float, list[float], list[float]]:
    """UniPC's B(h) = h variant ("bh1", A1111's default) for one step of log-SNR length h, with
    data predictions at relative positions `rks` (the last is the step's own end, 1): returns
    phi_1 = e^-h - 1, B(h), and the system R rho = b of order len(rks), R[k][j] = rks[j] ** k,
    b[k] = (k + 1)! phi_(k+2)(h) / B(h), solved by the predictor and corrector."""
    hh = -h
    phi_1 = math.expm1(hh)
    b_h = hh
    phi_k = phi_1 / hh - 1
    factorial = 1
    R, b = [], []
    for k in range(1, len(rks) + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    return phi_1, b_h, R, b


def _solve(R: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x, sigma_from, sigma_to, m0, older, lambdas, order, model_to=None):
    """One UniP predictor step (model_to None) or UniC corrector step (model_to: the data
    prediction at the predicted point) of `order` from sigma_from to sigma_to. `m0` is the data
    prediction at sigma_from, `older` the earlier ones newest first, `lambdas` the log-SNRs of
    m0 and `older`, in the same order. In this form alpha is 1, so UniPC's
    x_t = sigma_t / sigma_s x_s - alpha_t phi_1 m0 - alpha_t B(h) sum rho_k D_k loses its alphas."""
    h = -math.log(sigma_to) - lambdas[0]
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:order]]
    differences = [(m - m0) / r for m, r in zip(older[: order - 1], rks)]
    phi_1, b_h, R, b = _unipc_weights(h, [*rks, 1.0])
    x = x * (sigma_to / sigma_from) - phi_1 * m0
    if model_to is not None:  # corrector: one difference more, the new point's own; rho 1/2 at order 1
        rhos = [0.5] if order == 1 else _solve(R, b)
        differences.append(model_to - m0)
    elif order > 2:  # predictor: the system without the step's end
        rhos = _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:  # rho 1/2 at order 2, no differences at order 1
        rhos = [0.5] * (order - 1)
    return x - b_h * sum((rho * d for rho, d in zip(rhos, differences)), torch.zeros_like(x))


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3):
    """UniPC (Zhao et al., 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models") on the data prediction, multistep, as A1111 runs it: order 3, B(h) = h,
    lower orders while the history fills up and on the last steps. Each model call corrects the
    point the last predictor reached (UniC) before the next prediction (UniP) uses it, so a step
    costs one call. The step to 0 is the model's estimate, where every order agrees."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    history: list[torch.Tensor] = []  # data predictions, newest first
    lambdas: list[float] = []  # their log-SNRs, -log sigma
    previous = None  # (x before the last prediction, its order)
    for i in trange(steps, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if previous is not None:
            x_before, step_order = previous
            x = _unipc_update(x_before, float(sigmas[i - 1]), sigma, history[0], history[1:], lambdas, step_order, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        history.insert(0, denoised)
        lambdas.insert(0, -math.log(sigma))
        del history[order:], lambdas[order:]
        step_order = min(order, i + 1, steps - i)
        previous = (x, step_order)
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, history[0], history[1:], lambdas, step_order)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent consistency models' multistep sampling (Luo et al., 2023): a consistency model maps
    any level straight to x0, so each step takes the model's estimate and noises it afresh to the
    next level."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = kd.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


def restart_segments(sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The level sequences Restart solves one after another, with A1111's settings: from 20 steps
    on, a Karras schedule between the given ends with fewer steps, and the stretch from its level
    nearest 2 down to its level nearest 0.1 solved again on a Karras schedule of its own: 9 steps
    once (20-35 steps) or steps // 4 twice (36 and more), so the step count stays the same. Under
    20 steps there is no restart."""
    steps = len(sigmas) - 1
    if steps < 20:
        return [sigmas]
    span, repeats = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = kd.get_sigmas_karras(steps - span * repeats, float(sigmas[-2]), float(sigmas[0]), device=sigmas.device)
    low, high = int((main - 0.1).abs().argmin()), int((main - 2.0).abs().argmin())
    if high >= low:
        return [main]
    restart = kd.get_sigmas_karras(span + 1, float(main[low]), float(main[high]), device=sigmas.device)[:-1]
    return [main[: low + 1], *[restart] * repeats, main[low:]]


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Restart sampling (Xu et al., 2023, "Restart Sampling for Improving Generative Processes"):
    an ODE solver (k-diffusion's Heun, Euler on a step to 0) down each of `restart_segments`;
    where a segment starts above the level reached, forward noise takes x back up to it first,
    sqrt(sigma_high^2 - sigma_low^2) of fresh noise, which contracts the error the ODE has
    accumulated. The callback's "i" counts steps over all segments."""
    noise_sampler = kd.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    done, level = 0, None
    for levels in restart_segments(sigmas):
        if level is not None and levels[0] > level:
            x = x + noise_sampler(level, levels[0]) * (levels[0] ** 2 - level ** 2) ** 0.5
        offset = done
        on_step = None if callback is None else (lambda d, offset=offset: callback({**d, "i": d["i"] + offset}))
        x = kd.sample_heun(model, x, levels, extra_args=extra_args, callback=on_step, disable=disable)
        done, level = done + len(levels) - 1, levels[-1]
    return x
