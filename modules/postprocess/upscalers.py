"""Upscalers: one table of pixel upscalers (resampling filters and the networks users put in
models/ESRGAN and its sibling folders) and one of latent upscale modes.

Every pixel upscaler answers the same call, `upscale(image, width, height)`, and returns exactly
that size. A network (any architecture spandrel recognises: ESRGAN, Real-ESRGAN, SwinIR, DAT...)
runs at its own scale, repeatedly if one pass is not enough, on overlapping tiles so that a large
image does not exhaust memory; the last step to the exact size is a Lanczos resize.

Network files are read like checkpoints: `.safetensors` directly, pickled `.pth`/`.pt`/`.ckpt`
through torch's weights-only unpickler (see modules/models/loader.py), so a file runs no code.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.models import loader

# The folders A1111 scans for upscaler networks, under models/.
NETWORK_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")
NETWORK_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# A1111 lets a network run at most this many times to reach the wanted size.
MAX_PASSES = 3
# Scale written in a file name such as "4x-UltraSharp", "4xNomos" or "RealESRGAN_x2plus"; A1111 lists 4 otherwise.
_NAMED_SCALE = re.compile(r"(?:^|[^a-z0-9])(?:(\d+)x|x(\d+))", re.IGNORECASE)
DEFAULT_NETWORK_SCALE = 4


class UpscalerError(ValueError):
    """An upscaler that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Upscaler:
    name: str
    resample: Image.Resampling | None = None  # a PIL filter, for the built-in upscalers
    path: Path | None = None  # a network file
    folder: str | None = None  # the models/ folder it came from, A1111's "model_name"

    @property
    def scale(self) -> float | None:
        """The network's scale as its name tells it (the file says it only once loaded)."""
        if self.path is None:
            return None
        match = _NAMED_SCALE.search(self.path.stem)
        return float(match[1] or match[2]) if match else float(DEFAULT_NETWORK_SCALE)


NONE = Upscaler("None")
BUILTIN: tuple[Upscaler, ...] = (
    NONE,
    Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
    Upscaler("Nearest", resample=Image.Resampling.NEAREST),
)


@dataclass(frozen=True)
class LatentUpscaleMode:
    name: str
    mode: str  # torch.nn.functional.interpolate's mode
    antialias: bool = False


LATENT_UPSCALE_MODES: tuple[LatentUpscaleMode, ...] = (
    LatentUpscaleMode("Latent", "bilinear"),
    LatentUpscaleMode("Latent (antialiased)", "bilinear", antialias=True),
    LatentUpscaleMode("Latent (bicubic)", "bicubic"),
    LatentUpscaleMode("Latent (bicubic antialiased)", "bicubic", antialias=True),
    LatentUpscaleMode("Latent (nearest)", "nearest"),
    LatentUpscaleMode("Latent (nearest-exact)", "nearest-exact"),
)


def find_latent_mode(name: str) -> LatentUpscaleMode | None:
    return next((m for m in LATENT_UPSCALE_MODES if m.name == name), None)


def upscale_latent(latent: torch.Tensor, mode: LatentUpscaleMode, height: int, width: int) -> torch.Tensor:
    """Latents (N, C, h, w) interpolated to (height, width) latent cells."""
    return F.interpolate(latent, size=(height, width), mode=mode.mode, antialias=mode.antialias)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image, width: int, height: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=resample)


# ---- networks ------------------------------------------------------------------------------------


def load_descriptor(path: Path, device: torch.device | str = "cpu", registry=None):
    """spandrel's descriptor of a network file (.safetensors or a pickle), read with `registry`
    (default: spandrel's own architectures); ValueError saying what is wrong with the file."""
    import spandrel  # here, not at the top: it loads every architecture it knows (over a second at start-up)

    path = Path(path)
    if path.suffix.lower() in loader.SAFETENSORS_SUFFIXES:
        state, _ = loader.read_state_dict(path)  # CheckpointError is a ValueError
    else:
        state = loader.read_pickle(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path.name}: holds a {type(state).__name__}, not a dictionary of weights")
    try:
        return spandrel.ModelLoader(device, registry or spandrel.MAIN_REGISTRY).load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except spandrel.UnsupportedModelError as e:
        raise ValueError(f"{path.name}: not an architecture that spandrel knows") from e
    except Exception as e:  # each architecture's reader fails in its own way on weights that do not fit it
        raise ValueError(f"{path.name}: the weights do not fit the architecture they look like ({type(e).__name__}: {e})") from e


def read_network(path: Path, device: torch.device | str = "cpu"):
    """The spandrel ImageModelDescriptor of a network file, in eval mode; UpscalerError if the
    file cannot be read or is not an image-to-image network."""
    import spandrel  # here, not at the top, as in load_descriptor

    path = Path(path)
    try:
        descriptor = load_descriptor(path, device)
    except ValueError as e:
        raise UpscalerError(str(e)) from e
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{path.name}: a {descriptor.architecture.name} model needs a mask; it is not an upscaler")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise UpscalerError(
            f"{path.name}: the network takes {descriptor.input_channels} and gives {descriptor.output_channels} "
            f"channels; only RGB to RGB networks can upscale pictures"
        )
    return descriptor.eval()


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """forward(x) computed tile by tile: each `tile`-sided piece is run with `overlap` pixels of
    its neighbours around it as context, and only its own part of the result is kept, so there
    are no seams wherever the network sees no farther than `overlap` pixels. tile <= 0: one pass."""
    _, _, height, width = x.shape
    if tile <= 0 or (height <= tile and width <= tile):
        return forward(x)
    out = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            ctop, cleft = max(top - overlap, 0), max(left - overlap, 0)
            cbottom, cright = min(bottom + overlap, height), min(right + overlap, width)
            piece = forward(x[..., ctop:cbottom, cleft:cright])
            if out is None:
                out = torch.empty((x.shape[0], piece.shape[1], height * scale, width * scale), dtype=piece.dtype, device="cpu")
            y, z = (top - ctop) * scale, (left - cleft) * scale
            out[..., top * scale:bottom * scale, left * scale:right * scale] = \
                piece[..., y:y + (bottom - top) * scale, z:z + (right - left) * scale].cpu()
    return out


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def to_bytes(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as uint8, a quarter of float32's memory."""
    return (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) pixels, float in [0, 1] or uint8, as a picture."""
    if x.dtype != torch.uint8:
        x = to_bytes(x)
    return Image.fromarray(np.ascontiguousarray(x[0].permute(1, 2, 0).cpu().numpy()))


@dataclass(frozen=True)
class Tiling:
    size: int = 192  # pixels per side of a tile; 0 runs the whole image at once
    overlap: int = 8


class Upscalers:
    """The upscalers of one data folder: the built-in ones and the network files found now.
    Keeps the last network it ran loaded, since the same one is usually used again."""

    def __init__(self, models_root: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.models_root = Path(models_root)
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._loaded: tuple[tuple, object] | None = None

    def folders(self) -> list[Path]:
        return [self.models_root / name for name in NETWORK_FOLDERS]

    def networks(self) -> list[Upscaler]:
        found = []
        for folder in self.folders():
            if folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in NETWORK_SUFFIXES and p.is_file())
                found += [Upscaler(p.stem, path=p, folder=folder.name) for p in files]
        return found

    def all(self) -> list[Upscaler]:
        return [*BUILTIN, *self.networks()]

    def names(self) -> list[str]:
        return [u.name for u in self.all()]

    def find(self, name: str) -> Upscaler:
        for upscaler in self.all():
            if upscaler.name == name:
                return upscaler
        raise LookupError(
            f"Upscaler {name!r} not found. Available: {', '.join(self.names())}; "
            f"network files go in models/{', models/'.join(NETWORK_FOLDERS)}"
        )

    def network(self, upscaler: Upscaler):
        path = upscaler.path
        key = (path, path.stat().st_mtime_ns)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # free the previous network before reading the next
                descriptor = read_network(path).to(self.device)
                if self.dtype == torch.float16 and descriptor.supports_half:
                    descriptor = descriptor.half()
                self._loaded = (key, descriptor)
            return self._loaded[1]

    def upscale(self, image: Image.Image, name: str, width: int, height: int, tiling: Tiling = Tiling()) -> Image.Image:
        """`image` brought to width x height by the upscaler called `name`."""
        upscaler = self.find(name)
        if upscaler.path is None:
            # "None" changes nothing itself; reaching the asked size takes a Lanczos step, as in A1111.
            resample = Image.Resampling.LANCZOS if upscaler.resample is None else upscaler.resample
            return resize(image, width, height, resample)
        descriptor = self.network(upscaler)
        for done in range(MAX_PASSES):
            if image.width >= width and image.height >= height and (done or image.size != (width, height)):
                break
            before = image.size
            image = self._run(descriptor, image, tiling)
            if image.size == before:  # a 1x network: running it again gets no closer
                break
        return resize(image, width, height)

    def _run(self, descriptor, image: Image.Image, tiling: Tiling) -> Image.Image:
        import spandrel  # loaded by read_network already; imported here for the same start-up reason

        dtype = next(descriptor.model.parameters()).dtype
        x = image_to_tensor(image)
        tile = tiling.size if descriptor.tiling != spandrel.ModelTiling.INTERNAL else 0

        def forward(piece: torch.Tensor) -> torch.Tensor:
            # Each tile is turned into bytes at once, so the whole result is held as uint8.
            return to_bytes(descriptor(piece.to(self.device, dtype)))

        with torch.inference_mode():
            return tensor_to_image(tiled(forward, x, descriptor.scale, tile, tiling.overlap))
