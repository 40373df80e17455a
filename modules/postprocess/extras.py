"""Extras: upscaling finished pictures, one or many, and restoring their faces, as A1111's
"Extras" tab does.

    ExtrasRequest          what was asked (validated once, like a GenerationRequest)
    run(ctx, request, inputs)   each input picture -> upscaled picture, its text, its file

Each picture is upscaled, then its faces are restored by GFPGAN, then by CodeFormer, each blended
in by its visibility: A1111's order (its postprocessing scripts' order 1000, 2000, 3000).

A result keeps the text its source carried (the "parameters" of the generation, read from a
PNG chunk or a JPEG/WebP EXIF comment) and adds A1111's postprocessing line,
"Postprocess upscale by: 2, Postprocess upscaler: Lanczos, GFPGAN visibility: 0.5", in the
"postprocessing" and "extras" chunks where A1111 writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from modules.app import fields
from modules.app.config import Paths
from modules.app.fields import bounded, indexed
from modules.images import image_info, storage
from modules.images.infotext import format_params_line
from modules.postprocess.face_restore import CODEFORMER, GFPGAN, FaceRestorers, Restorer
from modules.postprocess.upscalers import NONE, target_size
from modules.service.jobs import Job

MODE = "extras"
RESIZE_MODES = ("Scale by", "Scale to")  # A1111's resize_mode 0 and 1
MAX_SCALE = 8.0
MAX_OUTPUT_SIDE = 8192
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")


class ExtrasError(ValueError):
    """A request or a picture a person has to fix; the message says which and why."""


@dataclass(frozen=True)
class ExtrasRequest:
    resize_mode: int = indexed(0, RESIZE_MODES)  # 0: scale by `upscaling_resize`; 1: scale to width x height
    upscaling_resize: float = bounded(2.0, 0, MAX_SCALE, whole=False, low_allowed=False)
    upscaling_resize_w: int = bounded(512, 1, MAX_OUTPUT_SIDE)
    upscaling_resize_h: int = bounded(512, 1, MAX_OUTPUT_SIDE)
    upscaling_crop: bool = True  # scale to: crop the result to exactly width x height
    upscaler_1: str = NONE.name
    upscaler_2: str = NONE.name
    upscaler_2_visibility: float = bounded(0.0, 0, 1, whole=False)
    gfpgan_visibility: float = bounded(0.0, 0, 1, whole=False)  # 0: no GFPGAN; 1: its faces alone
    codeformer_visibility: float = bounded(0.0, 0, 1, whole=False)
    codeformer_weight: float = bounded(0.0, 0, 1, whole=False)  # 0: CodeFormer's strongest change; 1: its weakest

    def validate(self, upscaler_names: Iterable[str]) -> "ExtrasRequest":
        names = list(upscaler_names)
        problems = fields.problems(self)
        for name in ("upscaler_1", "upscaler_2"):
            if getattr(self, name) not in names:
                problems.append(f"{name}: no upscaler called {getattr(self, name)!r}; available: {', '.join(names)}")
        if problems:
            raise ExtrasError("; ".join(problems))
        return dataclasses.replace(self, upscaling_resize=float(self.upscaling_resize),
                                   upscaler_2_visibility=float(self.upscaler_2_visibility),
                                   upscaling_crop=bool(self.upscaling_crop), gfpgan_visibility=float(self.gfpgan_visibility),
                                   codeformer_visibility=float(self.codeformer_visibility),
                                   codeformer_weight=float(self.codeformer_weight))

    def face_restorers(self) -> list[Restorer]:
        """The face restorers this request uses, in the order they run."""
        chosen = ((GFPGAN, self.gfpgan_visibility), (CODEFORMER, self.codeformer_visibility))
        return [restorer for restorer, visibility in chosen if visibility > 0]


@dataclass
class ExtrasInput:
    image: Image.Image
    name: str = ""  # the source file's stem, kept in the output's file name


@dataclass
class ExtrasResult:
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)  # the postprocessing line of each
    pngs: list[bytes] = field(default_factory=list)  # each picture as PNG, with all its text
    paths: list[Path] = field(default_factory=list)
    interrupted: bool = False


def postprocess_params(request: ExtrasRequest, source_size: tuple[int, int]) -> tuple[tuple[int, int], dict[str, object]]:
    """(size the upscalers produce, A1111's postprocessing info so far) for one picture."""
    width, height = source_size
    if request.resize_mode == 1:
        scale = max(request.upscaling_resize_w / width, request.upscaling_resize_h / height)
        info: dict[str, object] = {"Postprocess upscale to": f"{request.upscaling_resize_w}x{request.upscaling_resize_h}"}
    else:
        scale = request.upscaling_resize
        info = {"Postprocess upscale by": request.upscaling_resize}
    size = target_size(width, height, scale)
    if max(size) > MAX_OUTPUT_SIDE:
        raise ExtrasError(
            f"a {width}x{height} picture would become {size[0]}x{size[1]}; the largest side allowed is {MAX_OUTPUT_SIDE}"
        )
    return size, info


def crop_center(image: Image.Image, width: int, height: int) -> Image.Image:
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def upscale_one(ctx, request: ExtrasRequest, image: Image.Image) -> tuple[Image.Image, dict[str, object]]:
    """One picture through upscaler 1 (and upscaler 2 blended in), with its postprocessing info.
    Upscaler 1 "None" leaves the picture as it is, as in A1111."""
    image = image.convert("RGB")
    if request.upscaler_1 == NONE.name:
        return image, {}
    (width, height), info = postprocess_params(request, image.size)
    crop = request.resize_mode == 1 and request.upscaling_crop

    def upscale(name: str) -> Image.Image:
        result = ctx.upscalers.upscale(image, name, width, height, ctx.tiling)
        return crop_center(result, request.upscaling_resize_w, request.upscaling_resize_h) if crop else result

    result = upscale(request.upscaler_1)
    if crop:
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    info["Postprocess upscaler"] = request.upscaler_1
    if request.upscaler_2 != NONE.name and request.upscaler_2_visibility > 0:
        result = Image.blend(result, upscale(request.upscaler_2), request.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = request.upscaler_2
    return result, info


def restore_faces(restorers: FaceRestorers, request: ExtrasRequest, image: Image.Image) -> tuple[Image.Image, dict[str, object]]:
    """The picture's faces restored by GFPGAN, then CodeFormer, each blended in by its visibility,
    with A1111's postprocessing info for them."""
    info: dict[str, object] = {}
    if request.gfpgan_visibility > 0:
        image = blend(image, restorers.restore(image, GFPGAN), request.gfpgan_visibility)
        info["GFPGAN visibility"] = round(request.gfpgan_visibility, 3)
    if request.codeformer_visibility > 0:
        image = blend(image, restorers.restore(image, CODEFORMER, request.codeformer_weight), request.codeformer_visibility)
        info["CodeFormer visibility"] = round(request.codeformer_visibility, 3)
        info["CodeFormer weight"] = round(request.codeformer_weight, 3)
    return image, info


def blend(image: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    return restored if visibility >= 1 else Image.blend(image, restored, visibility)


def read_inputs(paths: Iterable[Path]) -> tuple[list[ExtrasInput], list[str]]:
    """(the pictures that could be read, a message for each file that could not)."""
    inputs, problems = [], []
    for path in paths:
        image, info = image_info.read_path(Path(path))
        if image is None:
            problems.append(info.error or f"{Path(path).name} could not be read")
        else:
            inputs.append(ExtrasInput(image, Path(path).stem))
    return inputs, problems


def directory_inputs(paths: Paths, folder: str | Path) -> tuple[list[ExtrasInput], list[str]]:
    """The pictures in a folder on the server (not its subfolders), by name; the folder must lie
    under one of `paths`' allowed roots."""
    given = str(folder).strip()
    if not given:
        raise ExtrasError("give the input directory: a folder on the computer running the web UI")
    folder = paths.server_folder(given, "input directory")
    if not folder.is_dir():
        raise ExtrasError(f"input directory {given!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExtrasError(f"no pictures ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return read_inputs(files)


def run(ctx, request: ExtrasRequest, inputs: list[ExtrasInput], output_dir: Path | None = None,
        job: Job | None = None, save: bool = True, restorers: FaceRestorers | None = None) -> ExtrasResult:
    """Upscales every input and restores its faces; saves each as
    outputs/extras-images/<date>/NNNNN-<name>.png (or in `output_dir`, which must lie under an
    allowed root) when `save` is set. The face restorers' networks are read once for the run,
    unless `restorers` that already hold them are given."""
    request = request.validate(ctx.upscalers.names())
    if not inputs:
        raise ExtrasError("no picture given")
    restorers = restorers or FaceRestorers(ctx.paths.models, ctx.models.policy.device)
    for restorer in request.face_restorers():
        restorers.check(restorer)  # a missing file is named before any picture is worked on
    job = job or Job()
    job.total_steps = len(inputs)
    if output_dir and str(output_dir).strip():
        folder = ctx.paths.server_folder(output_dir, "output directory")
    else:
        folder = storage.dated_dir(ctx.paths.outputs, MODE)
    result = ExtrasResult()
    for index, source in enumerate(inputs):
        if job.interrupted:
            result.interrupted = True
            break
        job.status = f"Picture {index + 1} of {len(inputs)}"
        image, info = upscale_one(ctx, request, source.image)
        image, faces = restore_faces(restorers, request, image)
        line = format_params_line({**info, **faces})
        carried = image_info.read_info(source.image)
        text = {**carried.items, "postprocessing": line, "extras": line} if line else dict(carried.items)
        png = storage.png_bytes(image, carried.parameters or None, text)
        if save:
            name = storage.sanitize_prompt(source.name, ctx.settings.filename_prompt_max)
            result.paths.append(storage.save_png(png, folder, name, what=f"the upscaled {source.name or 'picture'}"))
        result.images.append(image)
        result.infotexts.append(line)
        result.pngs.append(png)
        job.step = index + 1
    return result
