"""What the user asked for, as one frozen value that the UI and the API both build.

Each field is declared once, here: its name (A1111's), its default, and for numbers and options
its limits (modules/app/fields.py), which validate() checks and the API's schema shows.
`validate()` is the single place where bad input is caught; everything below trusts a request
that passed it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modules.app import fields
from modules.app.errors import RequestError
from modules.app.fields import bounded, indexed, one_of
from modules.generation import options
from modules.images import pictures
from modules.prompting.extra_networks import parse_extra_networks
from modules.prompting.prompt_parser import PromptError, validate_prompt
from modules.sampling.noise import Variation
from modules.sampling.registry import find_sampler
from modules.sampling.schedules import find_schedule, img2img_steps

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_CLIP_SKIP = 12
MAX_HR_SCALE = 8.0
MAX_OUTPAINT_PIXELS = 256
# Sizes are kept to multiples of this, as every size the UI and API accept.
SIZE_STEP = 8
NOISE_SOURCES = ("CPU", "GPU")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = bounded(20, 1, MAX_STEPS)
    cfg_scale: float = bounded(7.0, 1, 30, whole=False)
    seed: int = bounded(-1, -1, MAX_SEED)  # -1: a random one
    # Variation seeds (A1111's names and rules): each image's noise is turned subseed_strength of
    # the way towards its variation seed's (subseed + i; -1: a random one), and/or drawn as for a
    # picture of seed_resize_from_w x seed_resize_from_h (off unless both are above 0).
    # seed_enable_extras false (the UI's "Extra" unticked) turns all four off.
    subseed: int = bounded(-1, -1, MAX_SEED, only_with="seed_enable_extras")
    subseed_strength: float = bounded(0.0, 0, 1, whole=False, only_with="seed_enable_extras")
    seed_resize_from_w: int = bounded(0, -1, MAX_SIDE, only_with="seed_enable_extras")
    seed_resize_from_h: int = bounded(0, -1, MAX_SIDE, only_with="seed_enable_extras")
    seed_enable_extras: bool = True
    width: int = bounded(512, 64, MAX_SIDE, multiple=SIZE_STEP)
    height: int = bounded(512, 64, MAX_SIDE, multiple=SIZE_STEP)
    batch_count: int = bounded(1, 1, MAX_BATCH_COUNT)
    batch_size: int = bounded(1, 1, MAX_BATCH_SIZE)
    clip_skip: int = bounded(1, 1, MAX_CLIP_SKIP)
    noise_source: str = one_of("CPU", NOISE_SOURCES)
    checkpoint: str | None = None  # None: whatever the model manager has selected
    styles: tuple[str, ...] = ()  # names in styles.csv, applied to the prompts in this order
    # Hires fix (txt2img, A1111's names): sample at width x height, upscale, then an img2img pass.
    enable_hr: bool = False
    hr_scale: float = bounded(2.0, 1, MAX_HR_SCALE, whole=False, only_with="enable_hr")
    hr_upscaler: str = "Latent"  # a latent upscale mode or an upscaler's name
    hr_second_pass_steps: int = bounded(0, 0, MAX_STEPS, only_with="enable_hr")  # 0: as many as `steps`
    # A width and/or height to upscale to instead of by hr_scale (0: unset).
    hr_resize_x: int = bounded(0, 0, MAX_SIDE, multiple=SIZE_STEP, only_with="enable_hr")
    hr_resize_y: int = bounded(0, 0, MAX_SIDE, multiple=SIZE_STEP, only_with="enable_hr")
    # Of the hires pass here; of the whole job in img2img.
    denoising_strength: float = bounded(0.7, 0, 1, whole=False, only_with="enable_hr")
    # A second checkpoint (A1111's names; SDXL's refiner) that takes over each sampling pass once
    # this fraction of its steps is done, going on from the same latent. None: no refiner.
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = bounded(0.8, 0, 1, whole=False, low_allowed=False, only_with="refiner_checkpoint")

    mode = "txt2img"

    @property
    def strength_used(self) -> float | None:
        """The denoising strength sampling uses: img2img's, the hires pass's, or none."""
        return self.denoising_strength if self.mode == "img2img" or self.enable_hr else None

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "GenerationRequest":
        """Returns the request with sampler/schedule names canonicalised; raises RequestError."""
        problems = []
        for switch in ("enable_hr", "seed_enable_extras"):
            if getattr(self, switch) not in (False, True):
                problems.append(f"{switch} must be true or false, got {getattr(self, switch)!r}")
        problems += fields.problems(self)
        if self.seed_enable_extras and not problems:
            problems += self._seed_resize_problems()
        for field in ("prompt", "negative_prompt"):
            text = getattr(self, field)
            if not isinstance(text, str):
                problems.append(f"{field} must be text")
                continue
            try:
                validate_prompt(text)
                if field == "prompt":  # as in A1111, a negative prompt's <...> is text
                    parse_extra_networks(text)
            except PromptError as e:
                problems.append(f"{field}: {e}")
        if not isinstance(self.styles, (list, tuple)) or not all(isinstance(s, str) for s in self.styles):
            problems.append(f"styles must be a list of style names, got {self.styles!r}")
        if self.refiner_checkpoint is not None and not isinstance(self.refiner_checkpoint, str):
            problems.append(f"refiner_checkpoint must be a checkpoint's name, got {self.refiner_checkpoint!r}")
        sampler = scheduler = None
        try:
            sampler = find_sampler(self.sampler_name)
        except ValueError as e:
            problems.append(str(e))
        try:
            scheduler = find_schedule(self.scheduler)
        except ValueError as e:
            problems.append(str(e))
        if self.mode == "txt2img" and not problems and sampler.own_levels and self.steps < 2:
            # img2img's own rule (strength_problems) says the same of the steps it samples.
            problems.append(f"{sampler.name} needs at least 2 steps: it picks its own noise levels between the "
                            "schedule's highest and lowest above 0, which one step makes the same; raise the steps "
                            "or pick another sampler")
        if self.enable_hr and not problems:
            problems += self._hires_problems()
        if problems:
            raise RequestError("; ".join(problems))
        hires = dict(denoising_strength=float(self.denoising_strength), hr_scale=float(self.hr_scale)) if self.enable_hr else {}
        # A1111's UI and infotext say "None" for no refiner.
        refiner = None if self.refiner_checkpoint in (None, "", "None") else self.refiner_checkpoint
        refining = dict(refiner_switch_at=float(self.refiner_switch_at)) if refiner else {}
        # As A1111: without the extras, no variation seed (a random one, unused) and no resize.
        variation = (dict(subseed_strength=float(self.subseed_strength)) if self.seed_enable_extras else
                     dict(subseed=-1, subseed_strength=0.0, seed_resize_from_w=0, seed_resize_from_h=0))
        return self.replace(sampler_name=sampler.name, scheduler=scheduler.label, cfg_scale=float(self.cfg_scale),
                            styles=tuple(self.styles), enable_hr=bool(self.enable_hr), refiner_checkpoint=refiner,
                            seed_enable_extras=bool(self.seed_enable_extras), **hires, **refining, **variation)

    def _seed_resize_problems(self) -> list[str]:
        """A seed resize side that is on (above 0) must span a latent cell."""
        return [f"{name} must be 0 or -1 (off) or at least {SIZE_STEP}, got {getattr(self, name)}"
                for name in ("seed_resize_from_w", "seed_resize_from_h") if 0 < getattr(self, name) < SIZE_STEP]

    def refiner_step(self, steps: int) -> int | None:
        """After how many of a pass's `steps` the refiner takes over (A1111: at the first step
        whose share of the steps done reaches refiner_switch_at), or None when it never does."""
        if not self.refiner_checkpoint:
            return None
        switch = math.ceil(self.refiner_switch_at * steps - 1e-9)
        return switch if switch < steps else None

    def _hires_problems(self) -> list[str]:
        """What the hires fix's fields, each within its limits, make wrong together."""
        problems = strength_problems(self.denoising_strength, self.hr_schedule_steps(), self.sampler_name)
        if not isinstance(self.hr_upscaler, str) or not self.hr_upscaler:
            problems.append(f"hr_upscaler must be the name of an upscaler, got {self.hr_upscaler!r}")
        width, height = self.hr_target_size()
        if max(width, height) > MAX_SIDE or min(width, height) < 64:
            problems.append(f"the hires fix would make {width}x{height} pictures; each side must be from "
                            f"64 to {MAX_SIDE}")
        return problems

    def hr_cover_size(self) -> tuple[int, int]:
        """(width, height) the hires fix upscales the first pass to: by hr_scale, or to
        hr_resize_x/y. With both given and another aspect ratio, the size that covers them
        (cropped after), as A1111."""
        width, height, x, y = self.width, self.height, self.hr_resize_x, self.hr_resize_y
        if not x and not y:
            return _floor(width * self.hr_scale), _floor(height * self.hr_scale)
        if not y or (x and width / height < x / y):
            return x, _floor(x * height / width)
        return _floor(y * width / height), y

    def hr_target_size(self) -> tuple[int, int]:
        """(width, height) of the hires fix's final pictures."""
        width, height = self.hr_cover_size()
        return self.hr_resize_x or width, self.hr_resize_y or height

    def hr_schedule_steps(self) -> int:
        """The steps of the hires pass's schedule, of which img2img's rule samples the last ones."""
        return self.hr_second_pass_steps or self.steps

    def with_seed_resolved(self, rng: random.Random | None = None) -> "GenerationRequest":
        """The seed and the variation seed, where -1, made random ones (both, as A1111)."""
        rng = rng or random.SystemRandom()

        def fixed(seed: int) -> int:
            return rng.randrange(0, MAX_SEED - MAX_BATCH_COUNT * MAX_BATCH_SIZE) if seed == -1 else seed

        if self.seed != -1 and self.subseed != -1:
            return self
        return self.replace(seed=fixed(self.seed), subseed=fixed(self.subseed))

    def seeds(self) -> list[int]:
        """Image i of the whole job uses seed + i, whatever the batch layout; with a variation
        strength every image has the seed, and its own variation seed (A1111's rule)."""
        step = 0 if self.subseed_strength else 1
        return [self.seed + i * step for i in range(self.batch_count * self.batch_size)]

    def subseeds(self) -> list[int]:
        """Image i of the whole job's variation seed: subseed + i."""
        return [self.subseed + i for i in range(self.batch_count * self.batch_size)]

    def noise_variation(self, subseeds: Sequence[int], downscale: int) -> Variation | None:
        """What the variation seeds do to the noise of the images with these `subseeds`, the
        seed resize in latent cells (pixels // downscale); None when they do nothing."""
        resize = None
        if self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0:
            resize = (self.seed_resize_from_h // downscale, self.seed_resize_from_w // downscale)
        if not self.subseed_strength and resize is None:
            return None
        return Variation(tuple(subseeds), float(self.subseed_strength), resize)


def _floor(value: float) -> int:
    return int(value) // SIZE_STEP * SIZE_STEP


def strength_problems(strength, steps, sampler_name) -> list[str]:
    """What is wrong with a denoising strength for an img2img pass of `steps` steps, in a request
    with nothing else wrong (every field within its limits, the sampler known)."""
    sampler = find_sampler(sampler_name)
    if strength > 0 and sampler.own_levels and img2img_steps(steps, strength) < 2:
        return [f"{sampler.name} needs at least 2 noise levels, but denoising strength {strength} of "
                f"{steps} steps leaves 1; raise the strength or the steps, or pick another sampler"]
    return []


@dataclass(frozen=True)
class Img2ImgRequest(GenerationRequest):
    """img2img, inpainting and outpainting; option names and index values are A1111's.

    `init_images` (and `mask`) may hold PIL images, file bytes or base64 text; validate() turns
    them into RGB pictures (transparency laid onto white) and a 0/255 mask of the pictures' size.
    One picture serves the whole batch; several must number at most batch_size, which then
    becomes their number (as A1111 does). A mask of another size but the same shape is scaled.
    """

    init_images: tuple = ()
    mask: Any = None  # white (or painted, for a picture with transparency) = regenerate
    denoising_strength: float = bounded(0.75, 0, 1, whole=False)
    resize_mode: int = indexed(0, [m.name for m in options.RESIZE_MODES])
    mask_blur: int = bounded(4, 0, 128)
    inpainting_fill: int = indexed(1, options.MASKED_CONTENT)  # 1: original
    inpaint_full_res: bool = False  # "Inpaint area": False whole picture, True only masked
    inpaint_full_res_padding: int = bounded(32, 0, 256)
    inpainting_mask_invert: int = indexed(0, options.MASK_MODES)  # "Mask mode": 0 inpaint masked, 1 not masked
    inpainting_mask_weight: float = bounded(1.0, 0, 1, whole=False)  # "Conditional mask weight" (inpainting models)
    # "Poor man's outpainting": 0 off, else the pixels added in each direction.
    outpaint_pixels: int = bounded(0, 0, MAX_OUTPAINT_PIXELS, multiple=SIZE_STEP)
    outpaint_directions: tuple[str, ...] = options.OUTPAINT_DIRECTIONS

    mode = "img2img"

    def validate(self) -> "Img2ImgRequest":
        problems: list[str] = []
        try:
            request = super().validate()
        except RequestError as e:
            problems.append(str(e))
            request = self
        images, mask = self._pictures(problems)
        batch_size = self.batch_size
        if isinstance(batch_size, int) and 1 < len(images) <= MAX_BATCH_SIZE:
            if len(images) > batch_size:
                problems.append(f"{len(images)} init images for a batch of {batch_size}; send one, or at most batch_size")
            batch_size = len(images)
        problems += self._option_problems()
        if self.outpaint_pixels and mask is not None:
            problems.append("outpainting makes its own mask; send no mask with it")
        if not problems:
            problems += strength_problems(self.denoising_strength, self.steps, self.sampler_name)
        if not problems and self.outpaint_pixels:
            left, right, up, down = (self.outpaint_pixels if d in self.outpaint_directions else 0 for d in options.OUTPAINT_DIRECTIONS)
            width, height = self.width + left + right, self.height + up + down
            if max(width, height) > MAX_SIDE:
                problems.append(f"the outpainted picture would be {width}x{height}; at most {MAX_SIDE} a side")
        if not problems and mask is not None:
            inverted = bool(self.inpainting_mask_invert)
            if mask.getextrema() == ((0, 0) if not inverted else (255, 255)):
                problems.append(
                    "the mask is empty, so nothing would change: paint over the part to regenerate"
                    if not inverted else "the mask covers the whole picture, so with 'Inpaint not masked' nothing would change"
                )
        if problems:
            raise RequestError("; ".join(problems))
        return request.replace(
            init_images=tuple(images), mask=mask, batch_size=batch_size,
            denoising_strength=float(self.denoising_strength), inpainting_mask_weight=float(self.inpainting_mask_weight),
            inpaint_full_res=bool(self.inpaint_full_res), outpaint_directions=tuple(self.outpaint_directions),
        )

    def _pictures(self, problems: list[str]) -> tuple[list, Any]:
        """The init pictures as RGB and the mask as 0/255 at their size; problems are appended."""
        if isinstance(self.init_images, (str, bytes)) or not isinstance(self.init_images, (tuple, list)):
            problems.append("init_images must be a list of pictures")
            return [], None
        if not self.init_images:
            problems.append("an init image is needed")
        elif len(self.init_images) > MAX_BATCH_SIZE:
            problems.append(f"at most {MAX_BATCH_SIZE} init images, got {len(self.init_images)}")
            return [], None
        images = []
        for i, data in enumerate(self.init_images):
            what = "the init image" if len(self.init_images) == 1 else f"init image {i + 1}"
            try:
                images.append(pictures.to_rgb(pictures.read_image(data, what), what))
            except ValueError as e:
                problems.append(str(e))
        if self.mask is None or not images or len(images) < len(self.init_images):
            return images, None
        size = images[0].size
        if any(im.size != size for im in images):
            problems.append("with a mask, every init image must have the same size")
            return images, None
        try:
            mask = pictures.binary_mask(pictures.read_image(self.mask, "the mask"))
            return images, pictures.fit_mask(mask, size)
        except ValueError as e:
            problems.append(str(e))
            return images, None

    def _option_problems(self) -> list[str]:
        """What the fields' limits do not cover: flags and directions."""
        problems = []
        if self.enable_hr:
            problems.append("enable_hr: the hires fix is a txt2img option")
        if not isinstance(self.inpaint_full_res, (bool, int)) or self.inpaint_full_res not in (0, 1):
            problems.append(f"inpaint_full_res must be true or false, got {self.inpaint_full_res!r}")
        directions = self.outpaint_directions
        if self.outpaint_pixels and (
            isinstance(directions, str) or not isinstance(directions, (tuple, list)) or not directions
            or any(d not in options.OUTPAINT_DIRECTIONS for d in directions)
        ):
            problems.append(f"outpaint_directions must be one or more of {', '.join(options.OUTPAINT_DIRECTIONS)}; got {directions!r}")
        return problems
