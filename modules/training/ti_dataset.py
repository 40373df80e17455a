"""The pictures an embedding is trained on, and the prompts written for each of them.

A dataset folder holds images; an image may have a caption in a text file of the same name
(`cat.png` + `cat.txt`), else its file name is the caption (`a_red_cat-2.png` -> "a red cat").
A template file holds one prompt per line with `[name]` (the embedding's name) and
`[filewords]` (the caption, whose comma-separated tags may be shuffled or dropped) placeholders;
every training step picks a line at random, as A1111 does.

Pictures are encoded by the VAE once. "Latent sampling method" chooses what a step sees:
"once" a posterior sample drawn at load time, "deterministic" the posterior mean, "random" a
fresh sample each step (the mean and spread are kept for that).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SAMPLING = ("once", "deterministic", "random")
_NAME_NOISE = re.compile(r"[_\-\d]+")


class DatasetError(ValueError):
    """A dataset or template a person has to fix; the message names the file."""


@dataclass(frozen=True)
class Picture:
    path: Path
    caption: str
    mean: torch.Tensor  # scaled latent mean [C, h, w]
    std: torch.Tensor  # scaled latent spread, same shape
    fixed: torch.Tensor  # the latent "once" and "deterministic" use


def caption_for(path: Path) -> str:
    text_file = path.with_suffix(".txt")
    if text_file.is_file():
        return " ".join(text_file.read_text(encoding="utf-8", errors="replace").split())
    return " ".join(_NAME_NOISE.sub(" ", path.stem).split())


def read_templates(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"Cannot read the prompt template file {path}: {e}") from e
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"The prompt template file {path} has no lines")
    return lines


def filewords(caption: str, rng: random.Random, *, shuffle: bool, dropout: float) -> str:
    """The caption's comma-separated tags, each dropped with probability `dropout`, then
    shuffled when asked."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if dropout > 0:
        tags = [t for t in tags if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(tags)
    return ", ".join(tags)


def fill_template(template: str, name: str, words: str) -> str:
    return template.replace("[name]", name).replace("[filewords]", words)


def _pixels(path: Path, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: centre-cropped to a square and resized."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path.name} is not a readable image: {e}") from e
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"The dataset folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"The dataset folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


@torch.no_grad()
def load_pictures(sd_model, folder: Path, *, size: int, latent_sampling: str = "once", seed: int = 0) -> list[Picture]:
    """Every image of the folder, encoded on the VAE's device (its latents kept on the CPU);
    unreadable images stop loading with their name."""
    if latent_sampling not in LATENT_SAMPLING:
        raise DatasetError(f"latent sampling method must be one of {', '.join(LATENT_SAMPLING)}, got {latent_sampling!r}")
    if size % sd_model.downscale:
        raise DatasetError(f"the training size {size} must be a multiple of {sd_model.downscale}")
    vae = sd_model.first_stage_model
    weight = next(vae.parameters())
    device, dtype = weight.device, weight.dtype
    generator = torch.Generator().manual_seed(seed)
    pictures = []
    for path in image_files(folder):
        x = _pixels(path, size).unsqueeze(0).to(device, dtype)
        mean, logvar = vae.encode(x)
        mean = mean[0].float().cpu() * sd_model.scale_factor
        std = torch.exp(0.5 * logvar[0].float().cpu()) * sd_model.scale_factor
        fixed = mean if latent_sampling == "deterministic" else mean + std * torch.randn(mean.shape, generator=generator)
        pictures.append(Picture(path, caption_for(path), mean, std, fixed))
    return pictures


def latent_for(picture: Picture, latent_sampling: str, generator: torch.Generator) -> torch.Tensor:
    if latent_sampling == "random":
        return picture.mean + picture.std * torch.randn(picture.mean.shape, generator=generator)
    return picture.fixed
