"""How well the built-in model draws what it is asked for, on combinations it never saw.

    venv/bin/python bench/builtin_model_eval.py [--model models/Stable-diffusion/builtin-shapes.safetensors] [--n 100]
        [--seeds 2718 3141 1618] [--inpaint]

Prompts describe single-shape scenes whose (colour, shape) pair was held out of training (see
modules/training/shapes_dataset.py). Each picture is generated as the web UI would (the default
sampler, schedule and CFG scale of a GenerationRequest, 20 steps, empty negative prompt, one
image at a time), then read back from its pixels: background colour, shape colour, shape type,
position and size. Prints the percentage right for each and the seconds per image, text
encoding and VAE decode included, for each prompt set (`--seeds`) and over all of them. The
default sets chose nothing: SELECTION_SEEDS' sets were looked at while choosing which run and
export of the shipped model ships, so a score on them flatters that model, and they are marked
so when asked for. `--inpaint` also
scores inpainting: the same target scenes drawn first with another shape of another colour in
the target's place, then that shape's box masked and redrawn from the target's caption (see
edit_cases). `--autoencoder` scores the same pictures after a round trip through the model's
VAE alone, to tell drawing errors from autoencoder losses; `--text-use` shows which caption
words the UNet follows at all (see text_use).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.generation import img2img, pipeline  # noqa: E402
from modules.generation.request import GenerationRequest, Img2ImgRequest  # noqa: E402
from modules.models.sd_model import diffusion_target, noised  # noqa: E402
from modules.training import shapes_dataset  # noqa: E402

ATTRIBUTES = ("background", "colour", "shape", "position", "size")
# The prompt sets (scene seeds) looked at while choosing the shipped model's run and export, and
# sets that chose nothing.
SELECTION_SEEDS = (1234, 4321, 777)
FRESH_SEEDS = (2718, 3141, 1618)
DEFAULT_MODEL = Path("models/Stable-diffusion/builtin-shapes.safetensors")


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_model(path: Path, precision: str = "auto"):
    """The checkpoint in the precision (--precision's choices) and on the device the web UI
    would use."""
    from modules.app.config import Flags
    from modules.models.loader import load_checkpoint
    from modules.models.memory import DevicePolicy, place

    return place(load_checkpoint(path), DevicePolicy.from_flags(Flags(precision=precision)))


def generate(sd_model, prompt: str, seed: int, *, steps: int = 20, size: int | None = None,
             request: GenerationRequest | None = None, embeddings=None) -> np.ndarray:
    """One picture (uint8 [H, W, 3]) for `prompt`, sampled by the pipeline as the web UI does
    (`sd_model` as `load_model` gives it); `embeddings` an EmbeddingTable for the prompt's words."""
    size = size or sd_model.spec.resolution
    request = (request or GenerationRequest()).replace(prompt=prompt, steps=steps, width=size, height=size)
    latents = pipeline.sample_latents(sd_model, request, [seed], embeddings=embeddings)
    return np.asarray(pipeline.latents_to_images(sd_model, latents)[0])


def inpaint(sd_model, picture: np.ndarray, mask: np.ndarray, prompt: str, seed: int, *, steps: int = 20,
            request: GenerationRequest | None = None) -> np.ndarray:
    """`picture` (uint8 [H, W, 3]) with the white part of `mask` (uint8 [H, W]) redrawn for
    `prompt`, through the web UI's img2img steps: its inpainting defaults (mask blur, original
    content, whole picture) at denoising strength 1, the sampler settings of `request`."""
    size = picture.shape[0]
    settings = request or GenerationRequest()
    request = Img2ImgRequest(prompt=prompt, steps=steps, width=size, height=size, denoising_strength=1.0,
                             sampler_name=settings.sampler_name, scheduler=settings.scheduler,
                             cfg_scale=settings.cfg_scale, init_images=(Image.fromarray(picture),),
                             mask=Image.fromarray(mask))
    prepared = img2img.prepare(request)
    init, conditioning = prepared.start(sd_model, [seed], noise_source=request.noise_source, device=None)
    latents = pipeline.sample_latents(sd_model, request, [seed], init=init, image_conditioning=conditioning)
    return np.asarray(prepared.finish(pipeline.latents_to_images(sd_model, latents))[0])


MASK_MARGIN = 4  # pixels of background around the shape's box, as a person paints a mask roughly


def edit_cases(n: int, seed: int, size: int) -> tuple[list, np.ndarray, np.ndarray]:
    """(target scenes, starting pictures, masks) for the inpainting score. Each target is a held-out
    scene; its starting picture has a shape of another type and colour where the target's shape
    goes, at the same size; the mask is the box that holds either shape. The box gives place and
    size away, not the shape type or colour: those come from the caption alone."""
    rng = random.Random(seed)
    targets = shapes_dataset.held_out_scenes(n, seed)
    pictures, masks = [], []
    for scene in targets:
        wanted = scene.shapes[0]
        colour = rng.choice([c for c in shapes_dataset.COLOURS if c not in (scene.background, wanted.colour)])
        shape = rng.choice([s for s in shapes_dataset.SHAPES if s != wanted.shape])
        start = dataclasses.replace(scene, shapes=(dataclasses.replace(wanted, shape=shape, colour=colour),))
        pictures.append(shapes_dataset.render(start, size))
        boxes = np.array([shapes_dataset.shape_box(s, size) for s in (wanted, *start.shapes)])
        x0, y0 = np.clip(np.floor(boxes[:, :2].min(0)) - MASK_MARGIN, 0, size).astype(int)
        x1, y1 = np.clip(np.ceil(boxes[:, 2:].max(0)) + MASK_MARGIN, 0, size).astype(int)
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        masks.append(mask)
    return targets, np.stack(pictures), np.stack(masks)


def evaluate_inpainting(sd_model, n: int, seed: int, steps: int = 20, request: GenerationRequest | None = None
                        ) -> tuple[dict[str, float], float, np.ndarray]:
    """(scores, seconds per image, pictures) for n edits of edit_cases."""
    targets, starts, masks = edit_cases(n, seed, sd_model.spec.resolution)
    pictures = []
    started = time.perf_counter()
    for i, (scene, start, mask) in enumerate(zip(targets, starts, masks)):
        pictures.append(inpaint(sd_model, start, mask, shapes_dataset.caption(scene), seed + i, steps=steps,
                                request=request))
    seconds = (time.perf_counter() - started) / max(1, n)
    return score(pictures, targets), seconds, np.stack(pictures)


@torch.no_grad()
def autoencode(sd_model, pictures: np.ndarray) -> np.ndarray:
    """The pictures after encoding to latents and decoding back."""
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return to_pixels(sd_model.decode_first_stage(sd_model.encode_first_stage(x)))


def score(pictures, scenes) -> dict[str, float]:
    """Fraction of pictures in which each attribute reads back as the scene says."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for picture, scene in zip(pictures, scenes):
        got, want = shapes_dataset.read_scene(picture), shapes_dataset.scene_attributes(scene)
        for k in ATTRIBUTES:
            hits[k] += got[k] == want[k]
    return {k: v / max(1, len(scenes)) for k, v in hits.items()}


def evaluate(sd_model, n: int, seed: int, steps: int = 20, request: GenerationRequest | None = None
             ) -> tuple[dict[str, float], float, list[str], np.ndarray]:
    """(scores, seconds per image, prompts, pictures) for n held-out scenes."""
    scenes = shapes_dataset.held_out_scenes(n, seed)
    prompts = [shapes_dataset.caption(s) for s in scenes]
    pictures = []
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        pictures.append(generate(sd_model, prompt, seed + i, steps=steps, request=request))
    seconds = (time.perf_counter() - started) / max(1, n)
    return score(pictures, scenes), seconds, prompts, np.stack(pictures)


# Caption words the model should follow, and where each lives in a Scene.
SWAPPABLE = {
    "background": (tuple(shapes_dataset.COLOURS), lambda scene, v: dataclasses.replace(scene, background=v)),
    "colour": (tuple(shapes_dataset.COLOURS), lambda scene, v: _with_shape(scene, colour=v)),
    "shape": (shapes_dataset.SHAPES, lambda scene, v: _with_shape(scene, shape=v)),
    "position": (tuple(shapes_dataset.POSITIONS), lambda scene, v: _with_shape(scene, position=v)),
    "size": (tuple(shapes_dataset.SIZES), lambda scene, v: _with_shape(scene, size=v)),
}


def _with_shape(scene, **changes):
    return dataclasses.replace(scene, shapes=(dataclasses.replace(scene.shapes[0], **changes),))


@torch.no_grad()
def text_use(sd_model, n: int = 64, seed: int = 5, timesteps=(300, 600, 900)) -> dict[str, dict[int, float]]:
    """How much the UNet's loss (on noise or v, as it predicts) on true pictures grows when the caption names
    another value of one attribute: {attribute: {timestep: wrong-caption loss / right-caption
    loss}}. About 1.0 means the model does not use that attribute's words."""
    from modules.training.builtin_model import caption_tokens

    rng = random.Random(seed)
    scenes = shapes_dataset.held_out_scenes(n, seed)
    pictures = np.stack([shapes_dataset.render(s, sd_model.spec.resolution) for s in scenes])
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = sd_model.encode_first_stage(x)
    alphas = sd_model.alphas_cumprod.float()

    def loss(captions, xt, t, target):
        out = sd_model.apply_model(xt, t, sd_model.encode_text(caption_tokens(captions))[0])
        return (out.float() - target).pow(2).mean().item()

    wrong = {}
    for attribute, (values, swap) in SWAPPABLE.items():
        current = [shapes_dataset.scene_attributes(s)[attribute] for s in scenes]
        wrong[attribute] = [shapes_dataset.caption(swap(s, rng.choice([v for v in values if v != c])))
                            for s, c in zip(scenes, current)]
    right = [shapes_dataset.caption(s) for s in scenes]
    ratios: dict[str, dict[int, float]] = {attribute: {} for attribute in SWAPPABLE}
    for step in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(step))
        xt = noised(latents, noise, alphas[step])
        target = diffusion_target(sd_model.prediction, latents, noise, alphas[step])
        t = torch.full((n,), step)
        right_loss = loss(right, xt, t, target)  # the same for every attribute
        for attribute, captions in wrong.items():
            ratios[attribute][step] = loss(captions, xt, t, target) / right_loss
    return ratios


def save_grid(pictures: np.ndarray, path: Path, columns: int = 10) -> None:
    n, h, w, _ = pictures.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, p in enumerate(pictures):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = p
    Image.fromarray(grid).save(path)


def _report(title: str, scores: dict[str, float]) -> None:
    print(title + ": " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))


def _set_name(seed: int) -> str:
    return f"prompt set {seed}" + (" (chose the shipped model: flatters it)" if seed in SELECTION_SEEDS else "")


def _pooled(results: list[dict[str, float]]) -> dict[str, float]:
    """The mean over prompt sets of equal size: the share right over all their pictures."""
    return {k: sum(r[k] for r in results) / len(results) for k in ATTRIBUTES}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=100, help="number of held-out prompts (one picture each)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=list(FRESH_SEEDS),
                   help="one prompt set for each: picks the scenes, and picture i uses seed + i")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the web UI's")
    p.add_argument("--sampler", default=None, help="default: the web UI's")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="as the web UI's --precision (auto: bfloat16 on a CPU that has its instructions)")
    p.add_argument("--autoencoder", action="store_true", help="also score VAE round trips of true pictures")
    p.add_argument("--inpaint", action="store_true", help="also score inpainting a box with the held-out scenes")
    p.add_argument("--grid", type=Path, help="save the generated pictures as one PNG grid here")
    p.add_argument("--text-use", action="store_true",
                   help="also print how much the loss grows when the caption names a wrong attribute value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sd_model = load_model(args.model, args.precision)
    request = GenerationRequest()
    request = request.replace(**{k: v for k, v in (("cfg_scale", args.cfg_scale), ("sampler_name", args.sampler))
                                 if v is not None})
    print(f"{args.model}: {sd_model.spec.resolution} px, {args.n} held-out prompts, {args.steps} steps, "
          f"{request.sampler_name} / {request.scheduler}, CFG {request.cfg_scale}, "
          f"{torch.get_num_threads()} threads, {str(sd_model.model.diffusion_model.time_embed[0].weight.dtype)[6:]}")
    if args.autoencoder:
        scenes = [s for seed in args.seeds for s in shapes_dataset.held_out_scenes(args.n, seed)]
        truth = np.stack([shapes_dataset.render(s, sd_model.spec.resolution) for s in scenes])
        _report("autoencoder round trip", score(autoencode(sd_model, truth), scenes))
    if args.text_use:
        for attribute, by_step in text_use(sd_model).items():
            print(f"loss with a wrong {attribute} / right caption: "
                  + ", ".join(f"t={t} {ratio:.3f}" for t, ratio in by_step.items()))
    generated, inpainted, seconds, inpaint_seconds, grid = [], [], [], [], []
    for seed in args.seeds:
        scores, per_image, prompts, pictures = evaluate(sd_model, args.n, seed, args.steps, request)
        _report(f"generated, {_set_name(seed)}", scores)
        generated.append(scores)
        seconds.append(per_image)
        grid.append(pictures)
        if args.inpaint:
            inpaint_scores, per_image, inpainted_pictures = evaluate_inpainting(sd_model, args.n, seed, args.steps, request)
            _report(f"inpainted, {_set_name(seed)}", inpaint_scores)
            inpainted.append(inpaint_scores)
            inpaint_seconds.append(per_image)
            grid.append(inpainted_pictures)
        if args.grid and len(grid) == 1 + args.inpaint:  # the first set's pictures, in prompt order
            save_grid(np.concatenate(grid), args.grid)
            print(f"pictures of {_set_name(seed)} in {args.grid}; prompts in order"
                  f"{' (then the inpainted ones, same prompts)' if args.inpaint else ''}:")
            for i, prompt in enumerate(prompts):
                print(f"  {i:3d} {prompt}")
    if len(args.seeds) > 1:
        _report(f"generated, all {len(args.seeds)} sets", _pooled(generated))
        if args.inpaint:
            _report(f"inpainted, all {len(args.seeds)} sets", _pooled(inpainted))
    print(f"{sum(seconds) / len(seconds):.3f} s per image (text encoding, sampling and VAE decode)")
    if args.inpaint:
        print(f"{sum(inpaint_seconds) / len(inpaint_seconds):.3f} s per inpainted image")


if __name__ == "__main__":
    main()
