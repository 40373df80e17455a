"""The model as k-diffusion sees it, and classifier-free guidance on top.

`model_denoiser(sd_model)` turns the SD network (which predicts eps or v at a discrete timestep)
into a k-diffusion denoiser D(x, sigma) -> x0 estimate. `CFGDenoiser` wraps that with the prompt:
one batched model call for every image's prompt parts and negative prompt, combined as
uncond + cond_scale * sum_i w_i * (cond_i - uncond).
"""

from __future__ import annotations

import torch
from k_diffusion.external import DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser
from torch import nn


class _FollowsInputDevice:
    """The sigma tables are small buffers; the model may be moved between devices (offloading)
    after the denoiser was built, so the tables follow the input rather than the other way round.
    Only the tables move: the SD model is held as a bound method, not as a submodule."""

    def forward(self, input, sigma, **kwargs):
        if self.log_sigmas.device != input.device:
            self.to(input.device)
        return super().forward(input, sigma, **kwargs)


class EpsDenoiser(_FollowsInputDevice, DiscreteEpsDDPMDenoiser):
    """k-diffusion denoiser for an SD model that predicts the noise (SD 1.x)."""

    def __init__(self, sd_model):
        super().__init__(sd_model.apply_model, _alphas_cumprod(sd_model), quantize=False)

    def get_eps(self, x, t, context, **cond):  # cond: c_concat (inpainting), y (SDXL) where given
        return self.inner_model(x, t, context=context, **cond)


class VDenoiser(_FollowsInputDevice, DiscreteVDDPMDenoiser):
    """k-diffusion denoiser for an SD model that predicts v (SD 2.x 768-v style)."""

    def __init__(self, sd_model):
        super().__init__(sd_model.apply_model, _alphas_cumprod(sd_model), quantize=False)

    def get_v(self, x, t, context, **cond):
        return self.inner_model(x, t, context=context, **cond)


def _alphas_cumprod(sd_model) -> torch.Tensor:
    return sd_model.alphas_cumprod.detach().to("cpu", torch.float32)


# By SDModel.prediction.
DENOISERS = {"eps": EpsDenoiser, "v": VDenoiser}


def model_denoiser(sd_model):
    """The k-diffusion denoiser for `sd_model` (chosen by sd_model.prediction, 'eps' or 'v')."""
    prediction = getattr(sd_model, "prediction", "eps")
    kind = DENOISERS.get(prediction)
    if kind is None:
        raise ValueError(f"Unknown model prediction type {prediction!r}; expected one of: {', '.join(DENOISERS)}")
    return kind(sd_model)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance over a model denoiser, for a batch of images.

    Called by k-diffusion samplers as `model(x, sigma, **extra_args)` with extra_args
    `{"conditioning": Conditioning, "cond_scale": float}` (plus `c_concat` for inpainting models).
    Models with a vector input (SDXL) get each row's `ScheduledCond.vector_at(step)` as `y`.

    Inpainting adds `init_latent` and `keep` (1 where the original stays, 0 where it is
    regenerated): as A1111 does for k-diffusion samplers, every denoised estimate is replaced by
    the original latent outside the mask, so each step's x is the original plus that step's noise
    there and only the masked part is free to change.

    `step` picks the prompt-editing stage: conditioning tensors are `ScheduledCond.at(self.step)`.
    It starts at 0; `registry.run_sampler` sets it to (its value at the start) + i + 1 when the
    sampler reports step i, so evaluations for step i + 1 use that step's prompt. Set it before
    sampling to start somewhere else (img2img starting part-way through a schedule).

    `max_batch` limits how many rows go through the model at once (low memory); None: all at once.

    `report_uncond` is for samplers that step along the negative prompt's own estimate (CFG++;
    `registry.run_sampler` sets it for them): then every call runs the negative prompt, even where
    guidance alone would not need it, and leaves each image's estimate for it, masked as the
    result is, in `uncond_denoised`.
    """

    def __init__(self, inner_model, max_batch: int | None = None):
        super().__init__()
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.inner_model = inner_model
        self.max_batch = max_batch
        self.step = 0
        self.report_uncond = False
        self.uncond_denoised = None
        self._indices: dict[tuple, torch.Tensor] = {}

    def forward(self, x, sigma, *, conditioning, cond_scale, c_concat=None, init_latent=None, keep=None):
        batch = x.shape[0]
        if len(conditioning.cond) != batch or len(conditioning.uncond) != batch:
            raise ValueError(
                f"conditioning is for {len(conditioning.cond)} prompts and {len(conditioning.uncond)} negative "
                f"prompts, but the batch has {batch} images"
            )
        # Rows of the one model batch: every image's prompt parts, then (if needed) every negative prompt.
        rows, contexts, vectors = [], [], []
        for image, parts in enumerate(conditioning.cond):
            for cond, _weight in parts:
                rows.append(image)
                contexts.append(cond.at(self.step))
                vectors.append(cond.vector_at(self.step))
        n_cond = len(rows)
        # With scale 1 and weights summing to 1 the negative prompt cancels out: one pass fewer.
        weighted = any(abs(sum(w for _, w in parts) - 1) > 1e-6 for parts in conditioning.cond)
        need_uncond = self.report_uncond or cond_scale != 1 or weighted
        if need_uncond:
            rows.extend(range(batch))
            contexts.extend(u.at(self.step) for u in conditioning.uncond)
            vectors.extend(u.vector_at(self.step) for u in conditioning.uncond)

        index = self._index(rows, x.device)
        out = self._denoise(x[index], sigma[index], contexts, None if c_concat is None else c_concat[index],
                            None if vectors[0] is None else vectors)

        cond_out, uncond_out = out[:n_cond], out[n_cond:]
        denoised, row = [], 0
        for image, parts in enumerate(conditioning.cond):
            base = uncond_out[image] if need_uncond else torch.zeros_like(x[image])
            result = base.clone()
            for _cond, weight in parts:
                result += (cond_out[row] - base) * (weight * cond_scale)
                row += 1
            denoised.append(result)

        def kept(estimate):
            return estimate if keep is None else estimate * (1 - keep) + init_latent * keep

        if self.report_uncond:
            self.uncond_denoised = kept(uncond_out)
        return kept(torch.stack(denoised))

    def _index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        """`rows` as a tensor on `device`, made once per sampling run: a tensor made from a list
        on a GPU is a copy that waits for the device to finish its queued work, which at every
        step would leave the GPU idle while the next step is launched."""
        key = (tuple(rows), device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(rows, device=device)
        return self._indices[key]

    def _denoise(self, x, sigma, contexts, c_concat, vectors):
        """Runs the model over all rows, grouping rows whose contexts have the same shape
        (normally all of them) and splitting groups into chunks of at most max_batch rows."""
        groups: dict[tuple, list[int]] = {}
        for row, context in enumerate(contexts):
            groups.setdefault(tuple(context.shape), []).append(row)
        out = torch.empty_like(x)
        for members in groups.values():
            size = self.max_batch or len(members)
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                sel = self._index(chunk, x.device)
                context = torch.stack([contexts[r] for r in chunk]).to(x.device)
                extra = {} if c_concat is None else {"c_concat": c_concat[sel]}
                if vectors is not None:
                    extra["y"] = torch.stack([vectors[r] for r in chunk]).to(x.device)
                out[sel] = self.inner_model(x[sel], sigma[sel], context=context, **extra)
        return out
