"""Hires fix: a txt2img picture upscaled, then refined by an img2img pass at the larger size.

The first pass samples at the request's width x height. Its latents are upscaled, in latent
space by one of the latent modes or as pixels by an upscaler and encoded again, to cover the
target size, and cropped to it. The second pass samples them as img2img does: from part-way down
a schedule of `hr_second_pass_steps` (or `steps`) steps, by `denoising_strength`, with noise from
the same seeds. The sizes and steps follow from the request alone (GenerationRequest.hr_*). The
infotext keeps the first pass's "Size" (see parameters.infotext_params).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modules.generation import img2img
from modules.generation.request import GenerationRequest
from modules.postprocess import upscalers
from modules.sampling.schedules import img2img_steps


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The second pass as a request of its own: the target size and the hires steps."""
    width, height = request.hr_target_size()
    return request.replace(width=width, height=height, steps=request.hr_schedule_steps(), enable_hr=False)


def sampling_steps(request: GenerationRequest) -> int:
    """The steps the second pass samples (img2img's rule)."""
    return img2img_steps(request.hr_schedule_steps(), request.denoising_strength)


def check_upscaler(request: GenerationRequest, available: upscalers.Upscalers) -> None:
    """LookupError naming the choices when the request's upscaler is neither a latent mode nor here."""
    if upscalers.find_latent_mode(request.hr_upscaler) is None:
        try:
            available.find(request.hr_upscaler)
        except LookupError as e:
            modes = ", ".join(m.name for m in upscalers.LATENT_UPSCALE_MODES)
            raise LookupError(f"Hires upscaler: {e}; or a latent mode: {modes}") from None


def upscale(sd_model, latents: torch.Tensor, request: GenerationRequest, available: upscalers.Upscalers,
            to_images: Callable[[torch.Tensor], list], encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """First-pass latents -> latents of the target size. `to_images` decodes latents to pictures
    and `encode` turns [-1, 1] pixels into latents, each with the VAE in place."""
    cover_w, cover_h = request.hr_cover_size()
    mode = upscalers.find_latent_mode(request.hr_upscaler)
    if mode is not None:
        upscaled = upscalers.upscale_latent(latents, mode, cover_h // sd_model.downscale, cover_w // sd_model.downscale)
    else:
        pictures = [available.upscale(p, request.hr_upscaler, cover_w, cover_h) for p in to_images(latents)]
        upscaled = encode(img2img.to_tensor(pictures).to(latents.device, latents.dtype))
    width, height = request.hr_target_size()
    drop_h = upscaled.shape[2] - height // sd_model.downscale
    drop_w = upscaled.shape[3] - width // sd_model.downscale
    return upscaled[:, :, drop_h // 2:upscaled.shape[2] - (drop_h + 1) // 2, drop_w // 2:upscaled.shape[3] - (drop_w + 1) // 2]

