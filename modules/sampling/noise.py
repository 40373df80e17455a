"""Seeded noise. Every image draws from its own generator, so a seed reproduces its image whatever
the batch size or the image's place in the batch.

Streams follow A1111's: image i's starting noise is the first `torch.randn(shape)` of a generator
seeded with seeds[i]; an ancestral sampler's per-step noise continues that same stream (or, with a
non-zero seed delta, a stream seeded with seeds[i] + delta, A1111's "ENSD"); SDE samplers use a
Brownian tree per image seeded with seeds[i]. With the CPU source these numbers do not depend on the
machine, so the same seed gives the same picture everywhere.

A1111's variation seeds (`Variation`) change only the starting noise: it is turned part of the way
(slerp) towards the first draw of the image's variation seed, and/or drawn as for a smaller or
larger picture and placed centred. The per-step streams stay those of the image's own seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Variation:
    """A1111's variation seeds for one batch: image i's starting noise is its seed's turned
    `strength` of the way (slerp) towards the noise of subseeds[i]; with `resize_from` (latent
    height, width) both are drawn at that size and put in the middle of the seed's full-size
    noise, so that a picture keeps much of its composition when its size changes."""

    subseeds: tuple[int, ...]
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t=0) to `high` (t=1), tensors of one image [C, H, W].

    As A1111 mixes two noises: the vectors are the columns along dim 1 (one per channel and x),
    each pair turned by t of the angle between them, which keeps the unit variance a plain
    average would lose. Pairs nearly parallel on average are mixed linearly (acos is not
    accurate there)."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / sin_omega).unsqueeze(1) * low + (torch.sin(t * omega) / sin_omega).unsqueeze(1) * high


def _first_draw(seed: int, shape: Sequence[int], where: torch.device) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator(where).manual_seed(int(seed)), device=where)


def _centred(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """`outer` [C, H, W] with its middle replaced by `inner`'s middle: A1111's placement, offsets
    rounded down, an `inner` larger than `outer` cropped."""
    spans = []
    for inner_side, outer_side in zip(inner.shape[1:], outer.shape[1:]):
        offset = (outer_side - inner_side) // 2
        if offset >= 0:
            spans.append((slice(offset, offset + inner_side), slice(0, inner_side)))
        else:
            spans.append((slice(0, inner_side + 2 * offset), slice(-offset, inner_side + offset)))
    (to_y, from_y), (to_x, from_x) = spans
    placed = outer.clone()
    placed[:, to_y, to_x] = inner[:, from_y, from_x]
    return placed


def _varied(noise: torch.Tensor, seed: int, subseed: int, variation: Variation) -> torch.Tensor:
    """One image's noise (its seed's first draw) with the variation applied."""
    if variation.resize_from is None:
        return slerp(variation.strength, noise, _first_draw(subseed, noise.shape, noise.device)) if variation.strength else noise
    shape = (noise.shape[0], *variation.resize_from)
    small = _first_draw(seed, shape, noise.device)
    if variation.strength:
        small = slerp(variation.strength, small, _first_draw(subseed, shape, noise.device))
    return _centred(small, noise)


def image_noise(seeds: Sequence[int], shape: Sequence[int], source: str = "cpu", device=None,
                variation: Variation | None = None) -> torch.Tensor:
    """Starting noise, Tensor[len(seeds), *shape] (float32, unit variance) on `device`: each
    image's seed's first draw, changed by `variation` where one is given. The mixing is done where
    the numbers are drawn, so CPU noise stays the same on every machine."""
    if variation is None:
        return ImageNoise(seeds, shape, source, device).draw()
    if len(variation.subseeds) != len(seeds):
        raise ValueError(f"{len(variation.subseeds)} variation seeds for {len(seeds)} seeds")
    where = generator_device(source, device)
    noise = [_varied(_first_draw(seed, shape, where), seed, subseed, variation)
             for seed, subseed in zip(seeds, variation.subseeds)]
    return torch.stack(noise).to(torch.device(device or "cpu"))


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
