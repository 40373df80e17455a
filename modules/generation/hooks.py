"""The values generation hands its hook points (modules/service/hooks.py), all frozen copies:
what a hook does to them reaches the job only through what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from modules.generation.request import GenerationRequest


@dataclass(frozen=True)
class StepLatents:
    """One sampling step of one batch: the model's current estimate of the final latents."""

    request: GenerationRequest
    batch_index: int
    step: int  # 1-based, counting the earlier passes of this batch (the hires fix follows the first)
    steps: int  # of this batch, all passes
    latents: torch.Tensor  # a copy, on the CPU


@dataclass(frozen=True)
class Pictures:
    """A batch's pictures as decoded, before their infotexts are written and they are saved. A
    hook may return Pictures holding other images, as many and of the same sizes."""

    request: GenerationRequest
    batch_index: int
    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class SavedPicture:
    path: Path
    infotext: str
    request: GenerationRequest
