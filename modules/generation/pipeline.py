"""generate(ctx, request) -> Result: one txt2img or img2img job, written as the steps it takes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from modules.app.errors import RequestError
from modules.context import AppContext
from modules.generation import hires, img2img
from modules.generation.hooks import Pictures, SavedPicture, StepLatents
from modules.generation.parameters import infotext_params
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.images import storage
from modules.images.infotext import format_infotext
from modules.networks import embeddings as ti
from modules.networks import lora
from modules.prompting.conditioning import embeddings_used, encode_prompts
from modules.prompting.extra_networks import strip_extra_networks
from modules.sampling.denoiser import CFGDenoiser, model_denoiser
from modules.sampling.noise import Variation, image_noise
from modules.sampling.registry import find_sampler, run_sampler
from modules.sampling.schedules import get_sigmas, img2img_start, img2img_steps
from modules.service.hooks import Hooks
from modules.service.jobs import Job, SamplingStopped

log = logging.getLogger(__name__)


@dataclass
class Result:
    request: GenerationRequest  # validated, with the seed resolved
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    interrupted: bool = False


def latents_to_images(sd_model, latents: torch.Tensor) -> list[Image.Image]:
    with torch.no_grad():
        decoded = sd_model.decode_first_stage(latents)
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


def no_offload(part: str):
    """The `using` of a model whose parts all stay on the device."""
    return contextlib.nullcontext()


def sampling_steps(request: GenerationRequest) -> int:
    """How many steps sampling one batch takes: fewer than `steps` for img2img (A1111's rule),
    more with the hires fix's second pass."""
    if isinstance(request, Img2ImgRequest):
        return img2img_steps(request.steps, request.denoising_strength)
    return request.steps + (hires.sampling_steps(request) if request.enable_hr else 0)


@dataclass(frozen=True)
class Refiner:
    """The model that takes over each sampling pass part-way (request.refiner_checkpoint), with
    its own embeddings table and offload context."""

    model: object
    embeddings: object  # its EmbeddingTable
    using: Callable[[str], contextlib.AbstractContextManager]


def check_refiner(sd_model, refiner_model) -> None:
    """RequestError unless the refiner can go on from the main model's latents."""
    name = refiner_model.checkpoint.name
    if refiner_model.scale_factor != sd_model.scale_factor or refiner_model.latent_channels != sd_model.latent_channels:
        raise RequestError(f"the refiner {name} ({refiner_model.spec.family}) works in another latent space than "
                           f"the checkpoint ({sd_model.spec.family}); choose a refiner of the same family")
    if refiner_model.concat_channels and refiner_model.concat_channels != sd_model.concat_channels:
        raise RequestError(f"the refiner {name} is an inpainting model; use it with an inpainting checkpoint")


def check_finite(sd_model, latents: torch.Tensor) -> None:
    """RequestError when sampling gave NaN or infinite values, which would decode to a black
    picture. Checked once per pass, since reading the answer waits for the device."""
    if bool(torch.isfinite(latents).all()):
        return
    dtype = next(sd_model.model.parameters()).dtype
    if dtype == torch.float32:
        raise RequestError("The UNet gave NaN or infinite values in float32, so this batch's pictures would be black and "
                           "were not saved. The checkpoint's or a LoRA's weights may hold such values: try without "
                           "the LoRA, or another checkpoint.")
    raise RequestError(f"The UNet's values overflowed {str(dtype).removeprefix('torch.')} (NaN or infinite), so this "
                       "batch's pictures would be black and were not saved. Start the server with --no-half to compute "
                       "in float32 (twice the memory), or try a lower CFG scale.")


def _counting_on(callback: Callable[[dict], None], before: int) -> Callable[[dict], None]:
    """The callback of a stage that starts after `before` steps of the pass."""
    return lambda d: callback({**d, "i": d["i"] + before})


def sample_latents(sd_model, request: GenerationRequest, seeds: list[int], *, device=None,
                   using: Callable[[str], contextlib.AbstractContextManager] = no_offload,
                   callback: Callable[[dict], None] | None = None, embeddings=None,
                   init: img2img.InitLatent | None = None, image_conditioning: torch.Tensor | None = None,
                   refiner: Refiner | None = None, variation: Variation | None = None) -> torch.Tensor:
    """Steps 3-5 for one batch (one image per seed): conditioning, seeded noise (changed by the
    request's `variation` seeds, where it has one), sampling.
    `using(part)` puts a part of the model on the device while it works (offload modes);
    `callback` sees k-diffusion's dict after each step and may raise SamplingStopped;
    `embeddings` (an EmbeddingTable) gives the textual-inversion embeddings to use.

    img2img gives `init`: sampling starts part-way down the schedule from the encoded picture
    plus that level of noise, and where `init.keep` is 1 the original latent is kept.
    `image_conditioning` is an inpainting model's c_concat; without it such a model gets
    A1111's txt2img default (everything masked, a grey picture). With a `refiner`, the steps
    after request.refiner_step run on it: the same sampler goes on down the same levels from
    the latent reached, conditioned by the refiner's own text encoders."""
    device = device or torch.device("cpu")
    sampler = find_sampler(request.sampler_name)
    denoiser = model_denoiser(sd_model)
    sigmas = get_sigmas(request.scheduler, request.steps, denoiser, sampler).to(device)
    if init is None:
        latent_shape = (sd_model.latent_channels, request.height // sd_model.downscale, request.width // sd_model.downscale)
    else:
        sigmas = sigmas[img2img_start(request.steps, init.strength):]
        latent_shape = tuple(init.latent.shape[1:])
        if len(sigmas) < 2:  # strength 0: no noise to remove
            return init.latent

    # The stages of the pass: (model, its denoiser, embeddings, offload, the levels it samples).
    stages = [(sd_model, denoiser, embeddings, using, sigmas)]
    switch = request.refiner_step(len(sigmas) - 1) if refiner is not None else None
    if switch is not None:
        stages = [(sd_model, denoiser, embeddings, using, sigmas[:switch + 1]),
                  (refiner.model, model_denoiser(refiner.model), refiner.embeddings, refiner.using, sigmas[switch:])]

    # 4. Each image's starting noise from its own seed (on top of the picture, for img2img).
    x = image_noise(seeds, latent_shape, source=request.noise_source, device=device, variation=variation) * sigmas[0]
    if init is not None:
        x = x + init.latent
    if image_conditioning is None and sd_model.concat_channels:
        grey = torch.zeros(1, 3, request.height, request.width, device=device)
        with using("vae"):
            image_conditioning = img2img.inpaint_conditioning(sd_model, grey, None, 1.0, len(seeds))

    done = 0
    for model, stage_denoiser, model_embeddings, model_using, levels in stages:
        # 3. Text -> conditioning, one schedule per image (prompt editing switches at steps); the
        #    prompt's <lora:...> tags are not text, embeddings' vectors go where their names stand.
        prompt = strip_extra_networks(request.prompt)
        with model_using("text"), torch.no_grad():
            conditioning = encode_prompts(
                model, [prompt] * len(seeds), [request.negative_prompt] * len(seeds), request.steps, request.clip_skip,
                embeddings=model_embeddings, size=(request.width, request.height),
            )
        extra_args = {"conditioning": conditioning, "cond_scale": request.cfg_scale}
        if init is not None and init.keep is not None:
            extra_args.update(init_latent=init.latent, keep=init.keep)
        if image_conditioning is not None and model.concat_channels:
            extra_args["c_concat"] = image_conditioning

        # 5. Sampling; the callback reports progress and is where interrupt/skip take effect.
        guided = CFGDenoiser(stage_denoiser)
        guided.step = done  # prompt editing counts the pass's steps, whichever model runs them
        on_step = _counting_on(callback, done) if done and callback is not None else callback
        with model_using("unet"), torch.no_grad():
            x = run_sampler(
                sampler, guided, x, levels, extra_args=extra_args,
                callback=on_step, seeds=seeds, noise_source=request.noise_source,
            )
        check_finite(model, x)
        done += len(levels) - 1
    if init is not None and init.keep is not None:
        x = x * (1 - init.keep) + init.latent * init.keep
    return x


def _hires_pass(sd_model, request, latents, seeds, ctx, using, on_step, embeddings, refiner, variation) -> torch.Tensor:
    """The hires fix's upscale and second pass over one batch's first-pass latents, its noise
    from the same seeds and variation (as A1111)."""
    device = ctx.models.policy.device

    def to_images(latents):
        with using("vae"):
            return latents_to_images(sd_model, latents)

    def encode(pixels):
        with using("vae"), torch.no_grad():
            return sd_model.encode_first_stage(pixels)

    upscaled = hires.upscale(sd_model, latents, request, ctx.upscalers, to_images, encode)
    init = img2img.InitLatent(upscaled, request.denoising_strength)
    try:
        return sample_latents(sd_model, hires.second_pass_request(request), seeds, device=device, using=using,
                              callback=lambda d: on_step(d, before=request.steps), embeddings=embeddings, init=init,
                              refiner=refiner, variation=variation)
    except SamplingStopped as stopped:
        return stopped.latent


def save_picture(ctx: AppContext, request: GenerationRequest, image: Image.Image, seed: int, infotext: str,
                 hooks: Hooks | None = None) -> Path:
    """One picture as a PNG, its infotext inside, in today's folder of the request's mode; then
    the saved hooks hear of it."""
    outdir = storage.dated_dir(ctx.paths.outputs, request.mode)
    path = storage.save_image(image, outdir, seed=seed, prompt=request.prompt, infotext=infotext)
    if hooks is not None and hooks.saved:
        hooks.saved(SavedPicture(path, infotext, request))
    return path


def resolved(ctx: AppContext, request: GenerationRequest, hooks: Hooks | None = None) -> GenerationRequest:
    """The request as it runs: validated before its styles are written into the prompts (their
    names) and after (the prompts they make), seed fixed so every image can be reproduced; then
    as the request hooks leave it, resolved again if they changed it."""
    request = request.validate()
    prompt, negative = ctx.styles.apply(request.prompt, request.negative_prompt, request.styles)
    request = request.replace(prompt=prompt, negative_prompt=negative, styles=()).validate().with_seed_resolved()
    if hooks is not None and hooks.request:
        changed = hooks.request(request, type(request))
        if changed is not request:
            request = resolved(ctx, changed)
    return request


def hooked_pictures(hooks: Hooks, request: GenerationRequest, batch_index: int, images: list[Image.Image],
                    seeds: list[int]) -> list[Image.Image]:
    """A batch's pictures as the pictures hooks leave them; a hook's answer of another number or
    size of pictures is refused (logged) and the pictures stay as they were."""
    if not hooks.pictures:
        return images
    given = Pictures(request, batch_index, tuple(image.copy() for image in images), tuple(seeds))
    changed = hooks.pictures(given, Pictures)
    if changed is given:
        return images
    if [i.size for i in changed.images] != [i.size for i in images]:
        log.error("a pictures hook returned %d pictures where the batch has %d of size %s; ignored",
                  len(changed.images), len(images), images[0].size if images else None)
        return images
    return list(changed.images)


def generator(ctx: AppContext) -> Callable[..., Result]:
    """What runs a generation job: the scale-out backend (ctx.generator), else `generate` here.
    Both take (ctx, request, job=, save=) and give the same Result, pictures bit for bit."""
    return ctx.generator or generate


def generate(ctx: AppContext, request: GenerationRequest, job: Job | None = None, save: bool | None = None) -> Result:
    """Runs every batch of the request; `save` None follows the user's setting."""
    # 1. The request as it will run (after the hooks); the LoRA files the prompt names are found
    #    (or the job stops here, naming the one missing).
    job = job or Job()
    hooks = ctx.hooks.joined(job.hooks)
    request = resolved(ctx, request, hooks)
    loras = ctx.loras.resolve(request.prompt)
    if request.enable_hr:
        hires.check_upscaler(request, ctx.upscalers)
    result = Result(request=request)

    # 2. The model and what stays the same for every batch.
    job.status = "Loading the checkpoint"  # seen only while a job loads one
    sd_model = ctx.models.get(request.checkpoint, ctx.settings.sd_vae)
    checkpoint = sd_model.checkpoint
    model_hash = ctx.models.hash_of(checkpoint)
    seeds, subseeds = request.seeds(), request.subseeds()
    steps = sampling_steps(request)
    # A script that runs several generations on one job sets the whole total before the first.
    job.total_steps = max(job.total_steps, job.step + request.batch_count * steps)
    preview_every = ctx.settings.live_preview_every
    save = ctx.settings.save_images if save is None else save
    embeddings = ctx.embeddings.table(sd_model.text_width)
    refiner = refiner_params = None
    if request.refiner_checkpoint:
        refiner_model = ctx.models.get(request.refiner_checkpoint, ctx.settings.sd_vae, refiner=True)
        check_refiner(sd_model, refiner_model)
        refiner = Refiner(refiner_model, ctx.embeddings.table(refiner_model.text_width),
                          lambda part: ctx.models.using(refiner_model, part))
        refiner_params = {
            "Refiner": f"{refiner_model.checkpoint.name} [{ctx.models.hash_of(refiner_model.checkpoint)}]",
            "Refiner switch at": request.refiner_switch_at,
        }
    texts = [strip_extra_networks(request.prompt), request.negative_prompt]
    network_params = {
        "Lora hashes": ctx.loras.infotext_value(loras),
        "TI hashes": ti.infotext_value(embeddings_used(texts, request.steps, embeddings)),
    }

    def using(part: str):
        return ctx.models.using(sd_model, part)

    # img2img: the pictures resized, masked, cropped and filled once for all batches.
    prepared = img2img.prepare(request) if isinstance(request, Img2ImgRequest) else None
    info_request = request if prepared is None else request.replace(width=prepared.size[0], height=prepared.size[1])
    mask_weight = getattr(request, "inpainting_mask_weight", 1.0) if sd_model.concat_channels else None

    restore_weights = lora.apply(sd_model, loras)  # for this job only: undone in `finally`
    progress = tqdm(total=job.total_steps, desc=request.mode, unit="step", leave=False)
    try:
        for batch_index in range(request.batch_count):
            if job.interrupted:
                break
            job.skipped = False
            batch_seeds = seeds[batch_index * request.batch_size:(batch_index + 1) * request.batch_size]
            batch_subseeds = subseeds[batch_index * request.batch_size:(batch_index + 1) * request.batch_size]
            variation = request.noise_variation(batch_subseeds, sd_model.downscale)
            job.status = f"Batch {batch_index + 1} of {request.batch_count}"
            first_step = job.step

            def on_step(d, before: int = 0):  # `before`: the steps of earlier passes of this batch
                done = before + d["i"] + 1
                job.step = first_step + done
                progress.update(job.step - progress.n)
                if hooks.step:
                    hooks.step(StepLatents(request, batch_index, done, steps, d["denoised"].detach().to("cpu", copy=True)))
                if job.interrupted or job.skipped:
                    raise SamplingStopped(d["denoised"])
                if preview_every and (d["i"] + 1) % preview_every == 0 and done < steps:
                    with using("vae"):
                        job.preview = latents_to_images(sd_model, d["denoised"][:1])[0]
                    job.preview_id += 1

            # 3-5. Conditioning, noise, sampling (img2img: from the encoded pictures).
            init = conditioning = None
            if prepared is not None:
                with using("vae"):
                    init, conditioning = prepared.start(sd_model, batch_seeds, noise_source=request.noise_source,
                                                        device=ctx.models.policy.device)
            try:
                latents = sample_latents(sd_model, request, batch_seeds, device=ctx.models.policy.device,
                                         using=using, callback=on_step, embeddings=embeddings,
                                         init=init, image_conditioning=conditioning, refiner=refiner,
                                         variation=variation)
            except SamplingStopped as stopped:
                latents = stopped.latent
            # The hires fix, unless the first pass was stopped (as in A1111).
            hires_done = request.enable_hr and not (job.interrupted or job.skipped)
            if hires_done:
                latents = _hires_pass(sd_model, request, latents, batch_seeds, ctx, using, on_step, embeddings, refiner,
                                      variation)
            result.interrupted = result.interrupted or job.interrupted

            # 6. Latents -> pixels (img2img: pasted back and composited over the original).
            with using("vae"):
                images = latents_to_images(sd_model, latents)
            if prepared is not None:
                images = prepared.finish(images)
            images = hooked_pictures(hooks, request, batch_index, images, batch_seeds)

            # 7. Infotext and PNG on disk, one per image.
            for image, seed, subseed in zip(images, batch_seeds, batch_subseeds):
                infotext = format_infotext(
                    request.prompt,
                    request.negative_prompt,
                    infotext_params(info_request.replace(enable_hr=hires_done), seed=seed, subseed=subseed, model_hash=model_hash,
                                    model_name=checkpoint.name, mask_weight=mask_weight,
                                    extra=prepared.params if prepared else None)
                    | network_params | (refiner_params or {}),
                )
                if save:
                    result.paths.append(save_picture(ctx, request, image, seed, infotext, hooks))
                result.images.append(image)
                result.infotexts.append(infotext)
                result.seeds.append(seed)
            job.step = first_step + steps
    finally:
        progress.close()
        restore_weights()
    return result
