"""Seeded noise. Every image draws from its own generator, so a seed reproduces its image whatever
the batch size or the image's place in the batch.

Streams follow A1111's: image i's starting noise is the first `torch.randn(shape)` of a generator
seeded with seeds[i]; an ancestral sampler's per-step noise continues that same stream (or, with a
non-zero seed delta, a stream seeded with seeds[i] + delta, A1111's "ENSD"); SDE samplers use a
Brownian tree per image seeded with seeds[i]. With the CPU source these numbers do not depend on the
machine, so the same seed gives the same picture everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from k_diffusion.sampling import BrownianTreeNoiseSampler

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cpu(device: torch.device) -> torch.device:
    return torch.device("cpu")


def _accelerator(device: torch.device) -> torch.device:
    # CUDA generators give other numbers than CPU ones; without a CUDA device this falls back to CPU.
    return device if device.type == "cuda" else torch.device("cpu")


# Where the random numbers are drawn, by the request's noise source (A1111's "Random number source").
SOURCES: dict[str, Callable[[torch.device], torch.device]] = {
    "cpu": _cpu,
    "gpu": _accelerator,
}


def generator_device(source: str, device: torch.device | str | None) -> torch.device:
    """The device whose generator draws the noise for `source` ('cpu' or 'gpu', any case)."""
    pick = SOURCES.get(str(source).lower())
    if pick is None:
        raise ValueError(f"Unknown noise source {source!r}; use one of: {', '.join(s.upper() for s in SOURCES)}")
    return pick(torch.device(device or "cpu"))


class ImageNoise:
    """One seeded generator per image; `draw()` returns the next tensor of every image's stream."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], source: str = "cpu", device=None):
        if not seeds:
            raise ValueError("at least one seed is needed")
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device or "cpu")
        self.gen_device = generator_device(source, self.device)
        self.generators = [torch.Generator(self.gen_device).manual_seed(int(seed)) for seed in seeds]

    def draw(self) -> torch.Tensor:
        noise = [torch.randn(self.shape, generator=g, device=self.gen_device) for g in self.generators]
        return torch.stack(noise).to(self.device)


def image_noise(seeds: Sequence[int], shape: Sequence[int], source: str = "cpu", device=None) -> torch.Tensor:
    """Starting noise, Tensor[len(seeds), *shape] (float32, unit variance) on `device`."""
    return ImageNoise(seeds, shape, source, device).draw()


def ancestral_noise_sampler(
    x: torch.Tensor, seeds: Sequence[int], source: str = "cpu", seed_delta: int = 0
) -> NoiseSampler:
    """Per-step noise for ancestral samplers (k-diffusion's `noise_sampler(sigma, sigma_next)`).

    With seed_delta 0 each image's stream continues after its starting noise (the first draw of
    the stream is skipped here, as `image_noise` already used it); otherwise it starts afresh from
    seed + seed_delta.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]} images")
    stream = ImageNoise([s + seed_delta for s in seeds], x.shape[1:], source, x.device)
    if seed_delta == 0:
        stream.draw()
    return lambda sigma, sigma_next: stream.draw().to(x.dtype)


def brownian_noise_sampler(
    x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], source: str = "cpu"
) -> NoiseSampler:
    """Per-step noise for SDE samplers: one k-diffusion Brownian tree per image, seeded with its seed.

    The trees live on the generator device of `source` (torchsde draws with a generator of the
    tree's device), so CPU noise is the same on every machine.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]} images")
    where = generator_device(source, x.device)
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min().to(where, torch.float32), sigmas.max().to(where, torch.float32)
    template = torch.zeros(x.shape, device=where, dtype=torch.float32)
    tree = BrownianTreeNoiseSampler(template, sigma_min, sigma_max, seed=[int(s) for s in seeds])

    # torchsde rounds the tree's ends to its tolerance (1e-6) and samplers recompute levels as
    # exp(-(-log sigma)); clamping queries into the rounded interval is what torchsde would do
    # anyway, without its warning.
    low, high = round(float(sigma_min), 6), round(float(sigma_max), 6)

    def level(sigma):
        return torch.tensor(min(max(float(sigma), low), high), dtype=torch.float64)

    def sample(sigma, sigma_next):
        return tree(level(sigma), level(sigma_next)).to(x.device, x.dtype)

    return sample
