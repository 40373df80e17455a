"""img2img over a folder of pictures (A1111's Batch tab): one request per picture, each result
saved beside the others in the output folder under the picture's own name."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from modules.app.errors import RequestError
from modules.app.fileio import atomic_write
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import Img2ImgRequest
from modules.images import storage
from modules.images.pictures import read_image
from modules.service.jobs import Job

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class FolderResult:
    paths: list[Path] = field(default_factory=list)  # every picture written, in order
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    images: list = field(default_factory=list)  # left empty: the pictures are on disk, not kept in memory
    skipped: list[str] = field(default_factory=list)  # "name: reason" for files that were not processed
    interrupted: bool = False


def pictures_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder(ctx: AppContext, text: str | Path, what: str) -> Path:
    folder = ctx.paths.server_folder(text, what) if str(text).strip() else None
    if folder is None or not folder.is_dir():
        raise RequestError(f"{what} {str(text)!r} is not a folder")
    return folder


def _free_name(folder: Path, stem: str) -> Path:
    """stem.png, or stem-1.png, stem-2.png, ... so that no file (an input picture among them) is replaced."""
    path, n = folder / f"{stem}.png", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def run_folder(ctx: AppContext, request: Img2ImgRequest, input_dir: str | Path, output_dir: str | Path = "",
               mask_dir: str | Path = "", generate: Callable | None = None, job: Job | None = None) -> FolderResult:
    """Every picture of `input_dir` through img2img with `request`'s settings. A picture's mask is
    the file of the same name (any picture suffix) in `mask_dir`, when one is given; otherwise the
    request's mask, if any, serves all. Results go to `output_dir` (default: the usual dated
    img2img folder). Every folder must lie under the data folder or an --allowed-path one.
    Files that cannot be used are skipped and listed with the reason. `generate` makes each
    picture's result (a script's, from the Script menu); by default, plain generation."""
    generate = generate or pipeline.generator(ctx)
    job = job or Job()
    source = _folder(ctx, input_dir, "Input directory")
    masks = None
    if str(mask_dir).strip():
        masks = {p.stem: p for p in pictures_in(_folder(ctx, mask_dir, "Inpaint batch mask directory"))}
    target = ctx.paths.server_folder(output_dir, "Output directory") if str(output_dir).strip() else None
    files = pictures_in(source)
    if not files:
        raise RequestError(f"Input directory {str(source)!r} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
    result = FolderResult()
    for number, path in enumerate(files, 1):
        if job.interrupted:
            result.interrupted = True
            break
        job.description = f"img2img batch: {path.name} ({number} of {len(files)})"
        try:
            changes: dict[str, object] = {"init_images": (read_image(path.read_bytes(), path.name),)}
            if masks is not None:
                if path.stem not in masks:
                    raise RequestError(f"no mask named {path.stem}.* in the mask directory")
                changes["mask"] = read_image(masks[path.stem].read_bytes(), f"mask {masks[path.stem].name}")
            done = generate(ctx, request.replace(**changes), job=job, save=False)
        except (ValueError, OSError) as e:  # RequestError is a ValueError
            result.skipped.append(f"{path.name}: {e}")
            continue
        for image, infotext, seed in zip(done.images, done.infotexts, done.seeds):
            if target is None:
                outdir = storage.dated_dir(ctx.paths.outputs, request.mode)
                saved = storage.save_image(image, outdir, seed=seed, prompt=request.prompt, infotext=infotext)
            else:
                data = storage.png_bytes(image, infotext)
                saved = atomic_write(_free_name(target, path.stem), lambda f, data=data: f.write(data))
            result.paths.append(saved)
            result.infotexts.append(infotext)
            result.seeds.append(seed)
        result.interrupted = done.interrupted
        if done.interrupted:
            break
    if not result.paths and result.skipped and not result.interrupted:
        raise RequestError("No picture could be processed. " + "; ".join(result.skipped[:3]))
    return result
