"""Inpainting and outpainting: what stays, what is redrawn and where, inpainting (9-channel) models,
masks from the editor's paint layers, the infotext, and the HTTP route."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modules.app.config import Flags
from modules.app.errors import RequestError
from modules.context import AppContext
from modules.generation import img2img, options, pipeline
from modules.generation.parameters import infotext_params, request_from_infotext
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.images import pictures
from modules.images.infotext import format_infotext
from modules.models.loader import load_checkpoint
from modules.training import shapes_dataset
from modules.ui.img2img import mask_from_layers
from tests.test_img2img import PROMPT, pixels, png, scene
from tests.tiny import tiny_sd_model

BLUR = 4
REACH = int(2.5 * BLUR + 0.5)  # how far the blurred mask spreads beyond the painted one


def left_mask(columns: int, size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[:, :columns] = 255
    return Image.fromarray(mask)


def square_mask(x: int, y: int, side: int, size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + side, x:x + side] = 255
    return Image.fromarray(mask)


def inpaint(ctx, **fields) -> Img2ImgRequest:
    base = dict(prompt=PROMPT, init_images=(scene(),), mask=left_mask(24), width=64, height=64, steps=8, seed=3,
                denoising_strength=1.0, mask_blur=BLUR)
    return pipeline.generate(ctx, Img2ImgRequest(**{**base, **fields}), save=False)


# ---- with the built-in model ----

@pytest.mark.parametrize("content", range(len(options.MASKED_CONTENT)))
def test_only_the_masked_part_is_redrawn(builtin_ctx, content):
    picture = scene()
    # The prompt names what stays and the new background: the strip is the only place left to
    # draw in, so a prompt naming another shape gets that shape drawn there.
    prompt = "a large red circle in the center on a yellow background"
    out = pixels(inpaint(builtin_ctx, init_images=(picture,), inpainting_fill=content, prompt=prompt).images[0])
    original = pixels(picture)
    # Outside the blurred mask every pixel is the original's, exactly.
    assert np.array_equal(out[:, 24 + REACH:], original[:, 24 + REACH:])
    # Inside, the prompt's yellow background replaces the blue one.
    inside = out[:, :24 - REACH].reshape(-1, 3).mean(0)
    assert inside[0] > 150 and inside[1] > 150 and inside[2] < 120, inside


def test_a_masked_shape_is_replaced_by_the_one_the_prompt_names_in_its_place(builtin_ctx):
    """The evaluation's inpainting case (bench/builtin_model_eval.py --inpaint): a box over a
    shape, redrawn from a caption that names another shape and colour at that place."""
    picture = scene(colour="yellow", shape="square", position="left")
    prompt = "a large red circle on the left on a blue background"
    for seed in (0, 1):
        out = pixels(inpaint(builtin_ctx, init_images=(picture,), mask=square_mask(0, 14, 36, 64), prompt=prompt,
                             seed=seed).images[0])
        assert np.array_equal(out[:, 36 + REACH:], pixels(picture)[:, 36 + REACH:])
        drawn = shapes_dataset.read_scene(out.astype(np.uint8))
        assert (drawn["background"], drawn["colour"], drawn["shape"], drawn["position"]) == ("blue", "red", "circle", "left")


def test_inpaint_not_masked_redraws_the_rest(builtin_ctx):
    picture = scene()
    out = pixels(inpaint(builtin_ctx, init_images=(picture,), inpainting_mask_invert=1).images[0])
    assert np.array_equal(out[:, :24 - REACH], pixels(picture)[:, :24 - REACH])
    assert np.abs(out[:, 24 + REACH:] - pixels(picture)[:, 24 + REACH:]).mean() > 30


def test_only_masked_crops_redraws_and_pastes_back_in_place(builtin_ctx):
    picture = scene(size=128)
    mask = square_mask(88, 16, 16, 128)
    request = Img2ImgRequest(prompt=PROMPT, init_images=(picture,), mask=mask, width=64, height=64, steps=8, seed=3,
                             denoising_strength=1.0, mask_blur=BLUR, inpaint_full_res=True, inpaint_full_res_padding=8)
    prepared = img2img.prepare(request.validate())
    x, y, w, h = prepared.paste_box
    # The box holds the blurred mask plus the padding, grown to the 64x64 shape, inside the picture.
    assert w == h and x <= 88 - REACH - 8 and y == 0 and x + w >= 104 + REACH + 8 and x + w <= 128
    result = pipeline.generate(builtin_ctx, request, save=False)
    out, original = pixels(result.images[0]), pixels(picture)
    assert out.shape == (128, 128, 3)
    changed = np.abs(out - original).sum(-1) > 0
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 16 - REACH and rows.max() < 32 + REACH and cols.min() >= 88 - REACH and cols.max() < 104 + REACH
    assert changed[18:30, 90:102].all()  # the painted square itself is new
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]


def test_paste_back_puts_the_crop_where_it_came_from():
    original = Image.new("RGB", (100, 80), (0, 0, 255))
    generated = Image.new("RGB", (64, 64), (0, 255, 0))
    overlay = square_mask(40, 30, 10, 100).crop((0, 0, 100, 80))
    out = pixels(img2img.composite(generated, original, overlay, paste_box=(30, 20, 32, 32)))
    green = (out == (0, 255, 0)).all(-1)
    assert np.array_equal(np.argwhere(green), np.argwhere(np.asarray(overlay) == 255))
    assert (out[~green] == (0, 0, 255)).all()


def test_outpainting_grows_by_exactly_the_asked_pixels(builtin_ctx):
    picture = scene()
    fields = options.outpaint_fields(16, 4, 0, ["left", "up"])
    result = pipeline.generate(builtin_ctx, Img2ImgRequest(prompt="a large red circle on a blue background", init_images=(picture,),
                                                           width=64, height=64, steps=8, seed=2, denoising_strength=0.8, **fields), save=False)
    out = pixels(result.images[0])
    assert out.shape == (80, 80, 3)
    # The mask reaches 2 x 4 pixels into the picture and its blur (sigma 8) 20 more; beyond that it is untouched.
    keep = 16 + 8 + int(2.5 * 8 + 0.5)
    assert np.array_equal(out[keep:, keep:], pixels(picture)[keep - 16:, keep - 16:])
    assert np.abs(out[:12, :12] - 0).mean() > 60  # the new border is drawn, not left black
    assert "Size: 80x80" in result.infotexts[0] and "Mask blur: 8, Masked content: fill" in result.infotexts[0]
    every_way = pipeline.generate(builtin_ctx, Img2ImgRequest(init_images=(picture,), width=64, height=64, steps=2,
                                                              **options.outpaint_fields(8, 4, 1, options.OUTPAINT_DIRECTIONS)), save=False)
    assert every_way.images[0].size == (80, 80)


# ---- masks ----

def test_painted_layers_make_the_mask_whatever_their_colour():
    layer_a = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    layer_a.putpixel((1, 1), (255, 255, 255, 255))
    layer_b = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    layer_b.putpixel((5, 2), (0, 0, 0, 200))
    mask = pictures.binary_mask(mask_from_layers([layer_a, layer_b]))
    assert np.argwhere(np.asarray(mask)).tolist() == [[1, 1], [2, 5]]
    assert mask_from_layers([Image.new("RGBA", (16, 8))]) is None
    assert mask_from_layers([]) is None


def test_uploaded_masks_are_read_as_a1111_reads_them():
    grey = Image.fromarray(np.array([[0, 128, 129, 255]], np.uint8))
    assert np.asarray(pictures.binary_mask(grey)).tolist() == [[0, 0, 255, 255]]
    rgb = Image.new("RGB", (4, 1), (255, 255, 255))
    assert np.asarray(pictures.binary_mask(rgb)).tolist() == [[255] * 4]
    transparent = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    transparent.putpixel((2, 0), (0, 0, 0, 255))  # painted in black: its opacity counts, not its colour
    assert np.asarray(pictures.binary_mask(transparent)).tolist() == [[0, 0, 255, 0]]


def test_mask_of_another_size_is_scaled_when_it_has_the_same_shape():
    checked = Img2ImgRequest(init_images=(scene(),), mask=left_mask(64, 128).crop((0, 0, 64, 128)).resize((32, 32)),
                             width=64, height=64).validate()
    assert checked.mask.size == (64, 64) and np.asarray(checked.mask).all()


@pytest.mark.parametrize("fields, words", [
    ({"mask": Image.new("L", (64, 32), 255)}, "the mask is 64x32 but the image is 64x64"),
    ({"mask": Image.new("L", (64, 64), 0)}, "the mask is empty"),
    ({"mask": Image.new("L", (64, 64), 255), "inpainting_mask_invert": 1}, "nothing would change"),
    ({"mask": b"junk"}, "the mask could not be read: not a picture"),
    ({"mask": left_mask(8), "outpaint_pixels": 8}, "outpainting makes its own mask"),
    ({"mask": left_mask(8), "init_images": (scene(), scene(size=32))}, "every init image must have the same size"),
    ({"mask": left_mask(8), "inpaint_full_res_padding": -1}, "inpaint_full_res_padding must be a whole number from 0 to 256"),
    ({"mask": left_mask(8), "inpainting_mask_weight": 2.0}, "inpainting_mask_weight must be a number from 0 to 1"),
])
def test_bad_masks_say_what_is_wrong(fields, words):
    with pytest.raises(RequestError) as caught:
        Img2ImgRequest(**{"init_images": (scene(),), "width": 64, "height": 64, **fields}).validate()
    assert words in str(caught.value)


# ---- infotext ----

def test_inpainting_options_are_written_and_read_as_a1111_does():
    request = Img2ImgRequest(prompt="p", init_images=(scene(),), mask=left_mask(24), width=64, height=64,
                             inpainting_mask_invert=1, inpainting_fill=2, inpaint_full_res=True, mask_blur=6).validate()
    prepared = img2img.prepare(request)
    params = infotext_params(request, seed=1, model_hash=None, model_name=None, mask_weight=None, extra=prepared.params)
    text = format_infotext("p", "", params)
    assert text.endswith(
        "Denoising strength: 0.75, RNG: CPU, Mask blur: 6, Mask mode: Inpaint not masked, "
        "Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise"
    )
    fields = request_from_infotext(text, img2img=True)
    for name in ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                 "denoising_strength"):
        assert fields[name] == getattr(request, name), name
    # A1111 leaves out what a missing key means: original content, whole picture, inpaint masked.
    plain = request_from_infotext("p\nSteps: 20, Seed: 1, Denoising strength: 0.5, Mask blur: 4", img2img=True)
    assert (plain["inpainting_fill"], plain["inpaint_full_res"], plain["inpainting_mask_invert"]) == (1, False, 0)


# ---- inpainting models (9-channel UNet) ----

@pytest.fixture(scope="module")
def inpainting_model():
    return tiny_sd_model(seed=4, unet={"in_channels": 9})


def unet_inputs(model):
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_txt2img_on_an_inpainting_model_gets_a1111s_default_conditioning(inpainting_model):
    seen, handle = unet_inputs(inpainting_model)
    try:
        latents = pipeline.sample_latents(inpainting_model, GenerationRequest(width=64, height=64, steps=2, cfg_scale=1.0), [1, 2])
    finally:
        handle.remove()
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    x = seen[0]
    assert x.shape[1] == 9
    assert (x[:, 4] == 1).all()  # everything masked
    grey = inpainting_model.encode_first_stage(torch.zeros(1, 3, 64, 64))
    assert torch.allclose(x[:, 5:], grey.expand(2, -1, -1, -1), atol=1e-5)


def test_inpainting_model_sees_the_mask_and_the_masked_picture(inpainting_model):
    request = Img2ImgRequest(init_images=(scene(),), mask=left_mask(32), mask_blur=0, width=64, height=64,
                             steps=4, cfg_scale=1.0, denoising_strength=1.0).validate()
    prepared = img2img.prepare(request)
    init, conditioning = prepared.start(inpainting_model, [1], noise_source="CPU", device="cpu")
    assert conditioning.shape == (1, 5, 8, 8)
    assert conditioning[0, 0, :, :4].eq(1).all() and conditioning[0, 0, :, 4:].eq(0).all()
    seen, handle = unet_inputs(inpainting_model)
    try:
        pipeline.sample_latents(inpainting_model, request, [1], init=init, image_conditioning=conditioning)
    finally:
        handle.remove()
    assert all(torch.equal(x[:, 4:], conditioning) for x in seen)
    # Conditional mask weight 0 conditions on the whole picture, 1 on the picture with the mask blanked.
    weightless = img2img.prepare(request.replace(inpainting_mask_weight=0.0))
    _, whole = weightless.start(inpainting_model, [1], noise_source="CPU", device="cpu")
    assert torch.allclose(whole[:, 1:], inpainting_model.encode_first_stage(img2img.to_tensor(prepared.pictures)), atol=1e-5)
    assert not torch.allclose(whole[:, 1:], conditioning[:, 1:])


def test_inpainting_checkpoint_runs_txt2img_and_inpainting_end_to_end(inpainting_model, tmp_path):
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in inpainting_model.state_dict().items()}
    save_file(state, folder / "tiny-inpainting.safetensors", metadata={"resolution": "64"})
    assert load_checkpoint(folder / "tiny-inpainting.safetensors").spec.family == "SD1 inpainting"
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    txt = pipeline.generate(ctx, GenerationRequest(prompt="x", width=64, height=64, steps=2, seed=1), save=False)
    assert txt.images[0].size == (64, 64) and "Conditional mask weight: 1," in txt.infotexts[0]
    picture = scene()
    out = pipeline.generate(ctx, Img2ImgRequest(prompt="x", init_images=(picture,), mask=left_mask(24), width=64, height=64,
                                                steps=2, seed=1, inpainting_mask_weight=0.5), save=False)
    assert np.array_equal(pixels(out.images[0])[:, 24 + REACH:], pixels(picture)[:, 24 + REACH:])
    assert "Denoising strength: 0.75, Conditional mask weight: 0.5, RNG: CPU, Mask blur: 4" in out.infotexts[0]


# ---- over HTTP (tiny random model) ----

def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def test_inpaint_route_keeps_the_unmasked_pixels(live_server):
    picture = scene()
    # A1111's API defaults: only the masked area, no padding, mask blur 4.
    body = dict(init_images=[b64(picture)], mask=b64(square_mask(40, 8, 16, 64)), prompt="x", steps=3, seed=1,
                width=64, height=64, denoising_strength=1.0)
    r = httpx.post(f"{live_server}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    out, original = pixels(image), pixels(picture)
    changed = np.abs(out - original).sum(-1) > 0
    assert changed[10:22, 42:54].all()
    assert not changed[:, :40 - REACH].any() and not changed[24 + REACH:].any()
    assert "Inpaint area: Only masked, Masked area padding: 0" in image.info["parameters"]


def test_outpainting_script_over_http(live_server):
    body = dict(init_images=[b64(scene())], prompt="x", steps=2, width=64, height=64, script_name="Poor man's outpainting",
                script_args=[32, 4, 0, ["right", "down"]])
    r = httpx.post(f"{live_server}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (96, 96)
    bad = httpx.post(f"{live_server}/sdapi/v1/img2img", json={**body, "script_args": [20]}, timeout=120)
    assert bad.status_code == 422 and "multiple of 8" in bad.text
