"""img2img, inpainting and outpainting around the sampler, with A1111's semantics.

The request arrives validated, its pictures already read as RGB and its mask as 0/255 (see
images/pictures.py). `prepare(request)` does the pixel work once per request:

1. Outpainting puts the picture on a larger canvas and masks the new border.
2. The mask is inverted ("Inpaint not masked") and blurred ("Mask blur").
3. "Whole picture": picture and mask are resized to the request's size ("Resize mode").
   "Only masked": the box around the mask (plus padding, grown to the request's aspect ratio)
   is cut out of the full-size picture and resized to the request's size instead.
4. "Masked content" fill paints the masked area with the colours around it.

Per batch, `Prepared.start(...)` encodes the pictures with the VAE (once per request) and gives
the sampler its starting point: the latent, the denoising strength, which latent cells to keep
(masked content "latent noise" / "latent nothing" are applied here), and for inpainting models
the mask and masked-picture latent they are conditioned on. `Prepared.finish` puts the decoded
results back: pasted into the crop box, then composited over the original with the blurred mask,
so that every pixel outside the blurred mask is exactly the original's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from scipy.ndimage import gaussian_filter1d

from modules.generation.options import (
    INPAINT_AREAS,
    MASK_MODES,
    MASKED_CONTENT,
    OUTPAINT_DIRECTIONS,
    RESIZE_MODES,
    crop_and_resize,
    just_resize,
    resize_and_fill,
)
from modules.generation.request import Img2ImgRequest
from modules.sampling.noise import image_noise

# ---- masks -------------------------------------------------------------------------------------


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur with sigma `radius`, horizontally then vertically, each pass rounded to 8 bits:
    A1111's kernel of 2 * int(2.5 * radius + 0.5) + 1 taps with mirrored edges."""
    if radius <= 0:
        return mask
    values = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        values = np.rint(gaussian_filter1d(values, radius, axis=axis, mode="mirror", truncate=2.5))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


def crop_box(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) around every masked pixel, `padding` wider on each side within the
    picture; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def _grow_span(a: int, b: int, wanted: float, limit: int) -> tuple[int, int]:
    """[a, b) grown evenly to `wanted` long, pushed back inside [0, limit) and cut to it."""
    extra = int(wanted - (b - a))
    a, b = a - extra // 2, b + extra - extra // 2
    if b > limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def match_aspect(box: tuple[int, int, int, int], width: int, height: int, image_size: tuple[int, int]):
    """The box grown along its short side to the width:height shape of the sampling size, so the
    crop is not distorted when scaled to it."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow_span(y1, y2, (x2 - x1) / ratio, image_size[1])
    else:
        x1, x2 = _grow_span(x1, x2, (y2 - y1) * ratio, image_size[0])
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the masked area painted with the colours around it. The unmasked
    picture is blurred at ever smaller radii (the mask as transparency, so that only real pixels
    spread) and each blur is laid over the previous ones: far from the edge the colour is the
    broad average, near it the neighbouring detail; unmasked pixels come out unchanged."""
    visible = image.convert("RGBA")
    visible.putalpha(ImageOps.invert(mask))
    premultiplied = visible.convert("RGBa")  # blur colour weighted by opacity
    out = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(layers):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def outpaint_canvas(image: Image.Image, pixels: int, directions: Sequence[str], blur: int):
    """A1111's "Poor man's outpainting" canvas: the picture on a canvas `pixels` larger on each
    side in `directions`, the mask covering the new border and reaching `blur` pixels into the
    picture so the seam is blended, and the latent mask reaching blur // 4 pixels in.
    Returns (canvas, mask, latent mask)."""
    left, right, up, down = (pixels if d in directions else 0 for d in OUTPAINT_DIRECTIONS)
    width, height = image.width + left + right, image.height + up + down
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (left, up))

    def border_mask(overlap: int) -> Image.Image:
        mask = np.full((height, width), 255, np.uint8)
        x1, y1 = left + (overlap if left else 0), up + (overlap if up else 0)
        x2, y2 = width - right - (overlap if right else 0), height - down - (overlap if down else 0)
        mask[y1:max(y1, y2), x1:max(x1, x2)] = 0
        return Image.fromarray(mask, "L")

    return canvas, border_mask(blur), border_mask(blur // 4)


# ---- tensors -----------------------------------------------------------------------------------

def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB pictures -> [n, 3, H, W] float32 in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def mask_tensor(mask: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[1, 1, H, W] float32 0/1 mask (1 = regenerate), rounded, optionally resized (bicubic) first."""
    if size is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.BICUBIC)
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return values.round()[None, None]


def inpaint_conditioning(sd_model, pixels: torch.Tensor, mask: torch.Tensor | None, weight: float,
                         batch: int, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The c_concat of an inpainting UNet, [batch, 1 + C, h, w]: the mask at latent size and the
    latent of the picture with the masked part blanked out (0 = mid grey). `weight` (A1111's
    "Conditional mask weight") blends between the whole picture (0) and the blanked one (1).
    txt2img passes grey pixels and no mask: everything is masked."""
    if mask is None:
        mask = pixels.new_ones(1, 1, *pixels.shape[-2:])
    mask = mask.to(pixels.device, pixels.dtype)
    masked = torch.lerp(pixels, pixels * (1.0 - mask), float(weight))
    with torch.no_grad():
        latent = sd_model.encode_first_stage(masked)
    if latent_size is not None and tuple(latent.shape[-2:]) != tuple(latent_size):
        latent = F.interpolate(latent, size=latent_size, mode="bilinear")
    small_mask = F.interpolate(mask, size=latent.shape[-2:])
    conditioning = torch.cat([small_mask.expand(latent.shape[0], -1, -1, -1), latent], dim=1)
    return conditioning.expand(batch, -1, -1, -1) if conditioning.shape[0] == 1 else conditioning


# ---- one request, prepared ---------------------------------------------------------------------

@dataclass
class InitLatent:
    """Where img2img sampling starts (see pipeline.sample_latents)."""

    latent: torch.Tensor  # [B, C, h, w], the encoded pictures (masked content applied)
    strength: float  # denoising strength: how far along the noise schedule sampling starts
    keep: torch.Tensor | None = None  # [1, 1, h, w], 1 where the original latent stays (inpainting)


@dataclass
class Prepared:
    """An img2img request's pictures made ready for sampling, and the way results go back."""

    pictures: list[Image.Image]  # what the VAE encodes, at the sampling size (or own size: latent upscale)
    size: tuple[int, int]  # (width, height) the sampler works at
    strength: float
    latent_upscale: bool = False
    mask: Image.Image | None = None  # blurred mask at the sampling size: inpainting models' conditioning
    latent_mask: Image.Image | None = None  # what the latent keep-mask is made from
    masked_content: str = "original"
    mask_weight: float = 1.0
    originals: list[Image.Image] = field(default_factory=list)  # full-size pictures to composite onto
    overlay: Image.Image | None = None  # at the originals' size: 255 = generated pixel, 0 = original
    paste_box: tuple[int, int, int, int] | None = None  # (x, y, w, h) of the "Only masked" crop
    params: dict[str, object] = field(default_factory=dict)  # infotext entries A1111 writes
    _encoded: torch.Tensor | None = field(default=None, repr=False)

    def start(self, sd_model, seeds: Sequence[int], *, noise_source: str, device) -> tuple[InitLatent, torch.Tensor | None]:
        """(InitLatent, c_concat or None) for one batch, one image per seed; call with the VAE in place."""
        device = torch.device(device or "cpu")
        latent_size = (self.size[1] // sd_model.downscale, self.size[0] // sd_model.downscale)
        pixels = to_tensor(self.pictures).to(device) if self._encoded is None or sd_model.concat_channels else None
        if self._encoded is None:
            with torch.no_grad():
                encoded = sd_model.encode_first_stage(pixels)
            if self.latent_upscale:
                encoded = F.interpolate(encoded, size=latent_size, mode="bilinear")
            self._encoded = encoded
        latent = self._encoded.expand(len(seeds), -1, -1, -1) if len(self._encoded) == 1 else self._encoded
        keep = None
        if self.latent_mask is not None:
            keep = 1.0 - mask_tensor(self.latent_mask, (latent_size[1], latent_size[0])).to(device, latent.dtype)
            latent = _apply_masked_content(self.masked_content, latent, keep, seeds, noise_source)
        conditioning = None
        if sd_model.concat_channels:
            mask = mask_tensor(self.mask) if self.mask is not None else None
            conditioning = inpaint_conditioning(sd_model, pixels, mask, self.mask_weight, len(seeds), latent_size)
        return InitLatent(latent, self.strength, keep), conditioning

    def finish(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Decoded batch -> final pictures: pasted into the crop box, composited over the
        originals with the blurred mask (image i of a batch belongs to init picture i when there
        are several)."""
        if self.overlay is None:
            return list(images)
        out = []
        for i, image in enumerate(images):
            original = self.originals[i if len(self.originals) > 1 else 0]
            out.append(composite(image, original, self.overlay, self.paste_box))
        return out


def _latent_noise(latent, keep, seeds, noise_source):
    # The seeds' first draw, as in A1111: the noise the sampler starts from unless variation seeds change that.
    noise = image_noise(seeds, latent.shape[1:], source=noise_source, device=latent.device).to(latent.dtype)
    return latent * keep + noise * (1 - keep)


# Masked content -> what happens to the masked latent cells before sampling ("fill" is done on pixels).
_LATENT_CONTENT = {
    "latent noise": _latent_noise,
    "latent nothing": lambda latent, keep, seeds, noise_source: latent * keep,
}


def _apply_masked_content(name, latent, keep, seeds, noise_source):
    apply = _LATENT_CONTENT.get(name)
    return latent if apply is None else apply(latent, keep, seeds, noise_source)


def composite(generated: Image.Image, original: Image.Image, overlay: Image.Image,
              paste_box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """`generated` over `original` where `overlay` says (255: generated, 0: original, between:
    a blend); with a paste box, `generated` is first scaled into that box of the original."""
    if paste_box is not None:
        x, y, w, h = paste_box
        placed = original.copy()
        placed.paste(crop_and_resize(generated, w, h), (x, y))
        generated = placed
    weight = np.asarray(overlay, dtype=np.float32)[..., None] / 255.0
    base = np.asarray(original, dtype=np.float32)
    mixed = base * (1.0 - weight) + np.asarray(generated, dtype=np.float32) * weight
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def prepare(request: Img2ImgRequest) -> Prepared:
    """Steps 1-4 of the module docstring for a validated request."""
    width, height = request.width, request.height
    mode = RESIZE_MODES[request.resize_mode]
    pictures = list(request.init_images)
    mask, latent_mask, params = request.mask, None, {}
    blur, only_masked = request.mask_blur, request.inpaint_full_res
    masked_content = MASKED_CONTENT[request.inpainting_fill]

    # 1. Outpainting: the pictures at the request's size on a larger canvas, the border masked.
    if request.outpaint_pixels:
        extended = [outpaint_canvas(mode.resize(p, width, height), request.outpaint_pixels,
                                    request.outpaint_directions, blur) for p in pictures]
        pictures = [canvas for canvas, _, _ in extended]
        _, mask, latent_mask = extended[0]
        (width, height), mode, only_masked = pictures[0].size, RESIZE_MODES[0], False

    if mask is None:
        if mode.latent:
            pictures = [just_resize(p, *_multiple_of_8(p.size)) for p in pictures]
        else:
            pictures = [mode.resize(p, width, height) for p in pictures]
        return Prepared(pictures, (width, height), request.denoising_strength, latent_upscale=mode.latent)

    # 2. Inversion (of a mask the person gave) and blur.
    if request.inpainting_mask_invert and not request.outpaint_pixels:
        mask = ImageOps.invert(mask)
        params["Mask mode"] = MASK_MODES[1]
    mask = blur_mask(mask, blur)
    params = {"Mask blur": blur, **params}

    # 3. Whole picture or only the masked part.
    paste_box = None
    box = crop_box(mask, request.inpaint_full_res_padding) if only_masked else None
    if box is not None:
        x1, y1, x2, y2 = match_aspect(box, width, height, mask.size)
        paste_box = (x1, y1, x2 - x1, y2 - y1)
        originals, overlay = pictures, mask
        sampling_mask = resize_and_fill(mask.crop((x1, y1, x2, y2)), width, height)
        pictures = [resize_and_fill(p.crop((x1, y1, x2, y2)), width, height) for p in pictures]
        params.update({"Inpaint area": INPAINT_AREAS[1], "Masked area padding": request.inpaint_full_res_padding})
    else:
        # With a mask, latent upscale scales pixels like "Just resize": mask and picture must line up.
        fit = mode.resize if not mode.latent else just_resize
        sampling_mask = fit(mask, width, height)
        pictures = [fit(p, width, height) for p in pictures]
        originals = pictures
        overlay = sampling_mask.point(lambda v: min(255, v * 2))  # A1111 doubles it: the inner half is fully new
    latent_mask = latent_mask or sampling_mask

    # 4. Masked content "fill".
    if masked_content == "fill":
        pictures = [fill_masked(p, latent_mask) for p in pictures]
    if masked_content != "original":
        params["Masked content"] = masked_content

    return Prepared(
        pictures, (width, height), request.denoising_strength, mask=sampling_mask, latent_mask=latent_mask,
        masked_content=masked_content, mask_weight=request.inpainting_mask_weight, originals=originals,
        overlay=overlay, paste_box=paste_box, params=params,
    )


def _multiple_of_8(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(8, round(side / 8) * 8) for side in size)
