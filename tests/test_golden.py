"""Golden pictures: fixed requests on the built-in model give the pictures and infotexts stored in
tests/golden/. A change that is meant to keep behaviour (a refactor, a move) must keep these.

The pictures are compared bit for bit on a processor of the kind that made them (the torch CPU
capability in tests/golden/manifest.json); elsewhere float rounding in other kernels may move a
few levels, so there the mean difference must stay under a level. Run this file as a script to
write the references again after a change that is meant to alter pictures:

    venv/bin/python tests/test_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from modules.generation import pipeline  # noqa: E402
from modules.generation.request import GenerationRequest, Img2ImgRequest  # noqa: E402
from modules.images import storage

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFEST = GOLDEN / "manifest.json"
SCENE = "a large red circle in the top left corner on a blue background"


def _box_mask(x: int, y: int, side: int, size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + side, x:x + side] = 255
    return Image.fromarray(mask, "L")


def _start_picture() -> Image.Image:
    """A fixed picture to redraw: the first case's output is not used, so that a change there
    does not hide one here."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 60, 200)
    pixels[8:28, 8:28] = (220, 30, 30)
    return Image.fromarray(pixels, "RGB")


def cases() -> dict[str, GenerationRequest]:
    common = dict(width=64, height=64, steps=8, cfg_scale=7.0)
    return {
        "txt2img-euler-a": GenerationRequest(prompt=SCENE, seed=1, batch_size=2, **common),
        "txt2img-dpmpp-2m-karras": GenerationRequest(
            prompt="[a small green square:a large yellow star:0.5] in the center on a (purple:1.2) background",
            negative_prompt="red", sampler_name="DPM++ 2M", scheduler="Karras", seed=7, cfg_scale=5.0,
            width=64, height=64, steps=8),
        "txt2img-hires-latent": GenerationRequest(
            prompt=SCENE, seed=3, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, denoising_strength=0.5, **common),
        "img2img-crop-and-resize": Img2ImgRequest(
            prompt="a large yellow star on a green background", init_images=(_start_picture().resize((80, 64)),),
            resize_mode=1, denoising_strength=0.6, seed=11, **common),
        "inpaint-only-masked-fill": Img2ImgRequest(
            prompt="a large green square on a blue background", init_images=(_start_picture(),),
            mask=_box_mask(4, 4, 28), mask_blur=2, inpainting_fill=0, inpaint_full_res=True,
            inpaint_full_res_padding=8, denoising_strength=0.9, seed=5, **common),
        "outpaint-left": Img2ImgRequest(
            prompt=SCENE, init_images=(_start_picture(),), outpaint_pixels=16, outpaint_directions=("left",),
            mask_blur=8, inpainting_fill=0, denoising_strength=0.8, seed=9, **common),
    }


def generate(ctx, name: str) -> tuple[list[Image.Image], list[str]]:
    result = pipeline.generate(ctx, cases()[name], save=False)
    return result.images, result.infotexts


def _file(name: str, index: int) -> Path:
    return GOLDEN / f"{name}-{index}.png"


def _stored(name: str) -> tuple[list[np.ndarray], list[str]]:
    pictures, infotexts = [], []
    for path in sorted(GOLDEN.glob(f"{name}-*.png")):
        with Image.open(path) as image:
            pictures.append(np.asarray(image.convert("RGB")))
            infotexts.append(image.info.get("parameters", ""))
    return pictures, infotexts


@pytest.mark.parametrize("name", list(cases()))
def test_pictures_and_infotexts_match_the_stored_ones(builtin_ctx, name):
    made, infotexts = generate(builtin_ctx, name)
    stored, stored_infotexts = _stored(name)
    assert len(stored) == len(made), f"tests/golden holds {len(stored)} pictures for {name}"
    assert infotexts == stored_infotexts
    same_kind = json.loads(MANIFEST.read_text())["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for picture, reference in zip(made, stored):
        difference = np.abs(np.asarray(picture, np.int16) - reference.astype(np.int16))
        if same_kind:
            assert difference.max() == 0, f"{name}: {np.count_nonzero(difference)} values differ, by up to {difference.max()}"
        else:
            assert difference.mean() < 1.0, f"{name}: mean difference {difference.mean():.2f} levels"


def write_references() -> None:
    import shutil
    import tempfile

    from modules.app.config import Flags
    from modules.context import AppContext

    torch.set_num_threads(1)  # as conftest.py runs the tests
    data = Path(tempfile.mkdtemp())  # holding only the shipped model, as the builtin_ctx fixture does
    shipped = ROOT / "models" / "Stable-diffusion" / "builtin-shapes.safetensors"
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copyfile(shipped, data / "models" / "Stable-diffusion" / shipped.name)
    ctx = AppContext.create(Flags(data_dir=data, device="cpu", precision="fp32"))
    GOLDEN.mkdir(exist_ok=True)
    for old in GOLDEN.glob("*.png"):
        old.unlink()
    for name in cases():
        images, infotexts = generate(ctx, name)
        for index, (image, infotext) in enumerate(zip(images, infotexts)):
            _file(name, index).write_bytes(storage.png_bytes(image, infotext))
    MANIFEST.write_text(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                    "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    write_references()
