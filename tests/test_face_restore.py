"""Face restoration (GFPGAN, CodeFormer) in Extras and the API, without the real weights.

What runs as it would for a user: the files are found in models/GFPGAN and models/Codeformer,
spandrel reads real-size random GFPGAN and CodeFormer files, facexlib reads real-size random
detector and face-parser files from models/GFPGAN, missing files are named, and over the API a
picture goes through detection and back (the random detector is made to find no face).

What stands in, in the tests that restore a face: the face is where the test says it is (a random
detector finds faces anywhere), and the networks are small ones (a GFPGAN of spandrel's class at
an eighth of its width, a CodeFormer-shaped module, a ParseNet of facexlib's class at a few
channels), since the real-size ones take 10 to 20 s a face on one core. facexlib's alignment,
paste-back and mask, and everything of ours around them, run for real.
"""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from modules.api import routes
from modules.app.config import Flags
from modules.context import AppContext
from modules.images import storage
from modules.postprocess import extras, face_restore
from modules.postprocess.extras import ExtrasInput, ExtrasRequest
from modules.postprocess.face_restore import CODEFORMER, GFPGAN, FaceRestoreError, FaceRestorers
from tests.test_upscalers import tiny_esrgan_state

SIDE = 160  # the test pictures' size
# facexlib's five-point template of a 512x512 face (eyes, nose, mouth corners), and the face in a
# test picture: the template at a fifth of its size in the middle, so the face's crop covers the
# 102 px square from 29 to 131 and the picture's corners lie outside it.
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])
FACE_SCALE = 0.2
FACE_OFFSET = SIDE / 2 - 256 * FACE_SCALE


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors in float16, to halve the files' size: the loaders take them as they take float32."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A data folder as an A1111 user has it, every file random at the real size; removed afterwards (about 400 MB)."""
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet
    from spandrel.architectures.GFPGAN import GFPGAN as GFPGANNet
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    root = tmp_path_factory.mktemp("faces")
    gfpgan, codeformer = root / "models" / "GFPGAN", root / "models" / "Codeformer"
    gfpgan.mkdir(parents=True)
    codeformer.mkdir()
    torch.manual_seed(0)
    save_file(half(GFPGANNet().state_dict()), gfpgan / "GFPGANv1.4.safetensors")
    # As the released file: pickled, under "params_ema"; a small transformer, which spandrel reads off the shapes.
    codeformer_state = half(CodeFormer(dim_embd=64, n_layers=1, codebook_size=64).state_dict())
    torch.save({"params_ema": codeformer_state}, codeformer / "codeformer-v0.1.0.pth")
    detector = RetinaFace(network_name="resnet50", device="cpu")
    with torch.no_grad():  # "no face" everywhere: what a random detector finds is noise
        for head in detector.ClassHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0]).repeat(head.num_anchors))
    torch.save(half(detector.state_dict()), gfpgan / face_restore.DETECTOR_FILE)
    torch.save(half(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()), gfpgan / face_restore.PARSER_FILE)
    yield root
    shutil.rmtree(root)


class CodeFormerStandIn(torch.nn.Module):
    """Called as CodeFormer is, and as it does, nearer the input the higher the weight."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.weights: list[float] = []

    def forward(self, x, weight=0.5, adain=True):
        self.weights.append(weight)
        return torch.tanh(self.conv(x)) * (1 - weight) + x * weight, None


class Identity(torch.nn.Module):
    """Gives back the crop it is handed, and keeps it."""

    def __init__(self):
        super().__init__()
        self.crops: list[torch.Tensor] = []

    def forward(self, x, **kwargs):
        self.crops.append(x.clone())
        return x, None


class StandIns(FaceRestorers):
    """The real helper on the data folder's files, with the face where the test put it and small networks."""

    def __init__(self, models_root, networks: dict[str, torch.nn.Module]):
        super().__init__(models_root)
        self.stand_ins = networks

    def network(self, restorer):
        return self.stand_ins[restorer.name]

    def detect(self, bgr):
        return [TEMPLATE * FACE_SCALE * bgr.shape[1] / SIDE + FACE_OFFSET * bgr.shape[1] / SIDE]

    def helper(self):
        if self._helper is None:
            super().helper().face_parse = tiny_parser()
        return self._helper


def tiny_parser() -> torch.nn.Module:
    """A ParseNet of facexlib's class at 4 to 8 channels, drawing class 1 (skin) everywhere, so the
    whole crop is pasted back."""
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(2)
    parser = ParseNet(in_size=512, out_size=512, base_ch=4, parsing_ch=19, res_depth=1, ch_range=[4, 8]).eval()
    with torch.no_grad():
        parser.out_mask_conv.conv2d.weight.zero_()
        parser.out_mask_conv.conv2d.bias.copy_(torch.nn.functional.one_hot(torch.tensor(1), 19).float())
    return parser


def tiny_gfpgan() -> torch.nn.Module:
    from spandrel.architectures.GFPGAN import GFPGAN as GFPGANNet

    torch.manual_seed(1)
    return GFPGANNet(out_size=512, num_style_feat=32, channel_multiplier=1, num_mlp=2, narrow=1 / 8).eval()


@pytest.fixture(scope="module")
def ctx(models):
    return AppContext.create(Flags(data_dir=models, device="cpu"))


@pytest.fixture(scope="module")
def restorers(models):
    torch.manual_seed(3)
    return StandIns(models / "models", {"GFPGAN": tiny_gfpgan(), "CodeFormer": CodeFormerStandIn().eval()})


def face_picture(side=SIDE) -> Image.Image:
    """Noise, and a 'face' in the middle: the left half of the 512 px face square red, the right blue."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    face = np.zeros((512, 512, 3), np.uint8)
    face[:, :256] = (220, 40, 40)
    face[:, 256:] = (40, 40, 220)
    scale, offset = FACE_SCALE * side / SIDE, FACE_OFFSET * side / SIDE
    # PIL's affine data maps each output pixel back to the face square.
    inverse = (1 / scale, 0, -offset / scale, 0, 1 / scale, -offset / scale)
    square = Image.fromarray(face).transform((side, side), Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR)
    box = (round(offset), round(offset), round(offset + 512 * scale), round(offset + 512 * scale))
    picture.paste(square.crop(box), box[:2])
    return picture


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def run(ctx, restorers, **fields) -> tuple[Image.Image, str]:
    result = extras.run(ctx, ExtrasRequest(**fields), [ExtrasInput(face_picture())], save=False, restorers=restorers)
    return result.images[0], result.infotexts[0]


# ---- the files ---------------------------------------------------------------------------------


def test_spandrel_reads_the_files_a1111_users_have(models):
    table = FaceRestorers(models / "models")
    assert table.model_file(GFPGAN).name == "GFPGANv1.4.safetensors"  # not the helper's files beside it
    gfpgan = table.network(GFPGAN)
    assert type(gfpgan).__name__ == "GFPGANv1Clean" and not gfpgan.training
    assert next(gfpgan.parameters()).dtype == torch.float32
    codeformer = table.network(CODEFORMER)
    assert type(codeformer).__name__ == "CodeFormer"
    saved = torch.load(models / "models" / "Codeformer" / "codeformer-v0.1.0.pth")["params_ema"]
    assert torch.equal(codeformer.state_dict()["position_emb"], saved["position_emb"].float())


def test_a_file_of_another_kind_is_named(tmp_path):
    (tmp_path / "GFPGAN").mkdir()
    save_file(tiny_esrgan_state(), tmp_path / "GFPGAN" / "GFPGAN-upscaler.safetensors")
    with pytest.raises(FaceRestoreError, match=r"GFPGAN-upscaler.safetensors: holds ESRGAN, not GFPGAN; move it out of .*GFPGAN"):
        FaceRestorers(tmp_path).network(GFPGAN)
    (tmp_path / "Codeformer").mkdir()
    (tmp_path / "Codeformer" / "codeformer.pth").write_bytes(b"not a pickle")
    with pytest.raises(FaceRestoreError, match="codeformer.pth"):
        FaceRestorers(tmp_path).network(CODEFORMER)


def test_missing_files_are_named_with_their_folder(tmp_path):
    table = FaceRestorers(tmp_path)
    named = rf"GFPGAN model file \(such as GFPGANv1.4.pth, with \"GFPGAN\" in its name\) in {tmp_path / 'GFPGAN'}; there is none"
    with pytest.raises(FaceRestoreError, match=named):
        table.check(GFPGAN)
    with pytest.raises(FaceRestoreError, match=f"CodeFormer model file .* in {tmp_path / 'Codeformer'}"):
        table.check(CODEFORMER)
    (tmp_path / "Codeformer").mkdir()
    save_file(tiny_esrgan_state(), tmp_path / "Codeformer" / "codeformer.safetensors")
    both = f"read from {tmp_path / 'GFPGAN'}: put detection_Resnet50_Final.pth and parsing_parsenet.pth there"
    with pytest.raises(FaceRestoreError, match=both):
        table.check(CODEFORMER)
    (tmp_path / "GFPGAN").mkdir()
    (tmp_path / "GFPGAN" / face_restore.DETECTOR_FILE).write_bytes(b"")
    with pytest.raises(FaceRestoreError, match="put parsing_parsenet.pth there"):
        table.check(CODEFORMER)


def test_an_unreadable_helper_file_is_named(tmp_path):
    (tmp_path / "GFPGAN").mkdir()
    for name in face_restore.HELPER_FILES:
        (tmp_path / "GFPGAN" / name).write_bytes(b"not a pickle")
    unreadable = f"detection_Resnet50_Final.pth or parsing_parsenet.pth in {tmp_path / 'GFPGAN'} could not be read"
    with pytest.raises(FaceRestoreError, match=unreadable):
        FaceRestorers(tmp_path).helper()


# ---- Extras ------------------------------------------------------------------------------------


def test_visibility_zero_needs_no_file_and_leaves_the_picture(tmp_path):
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    source = face_picture()
    request = ExtrasRequest(gfpgan_visibility=0, codeformer_visibility=0, codeformer_weight=0.7)
    result = extras.run(ctx, request, [ExtrasInput(source)], save=False)
    assert np.array_equal(pixels(result.images[0]), pixels(source)) and result.infotexts == [""]


def test_a_missing_file_stops_the_run_before_any_picture(tmp_path):
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    with pytest.raises(FaceRestoreError, match=f"in {tmp_path / 'models' / 'Codeformer'}"):
        extras.run(ctx, ExtrasRequest(codeformer_visibility=0.5), [ExtrasInput(face_picture())])
    assert not (tmp_path / "outputs" / "extras-images").exists()


def test_the_crop_is_the_upright_face_and_goes_back_where_it_was(ctx, models):
    identity = Identity()
    image, _ = run(ctx, StandIns(models / "models", {"GFPGAN": identity}), gfpgan_visibility=1)
    [crop] = identity.crops
    assert crop.shape == (1, 3, 512, 512) and -1 <= crop.min() and crop.max() <= 1
    red, blue = crop[0, :, 100:400, 40:220].mean((1, 2)), crop[0, :, 100:400, 300:470].mean((1, 2))
    assert red[0] > 0.6 > red[2] + 1 and blue[2] > 0.6 > blue[0] + 1  # RGB, left half red, right half blue, as drawn
    # Back through the inverse warp and the mask: the picture as it was, to within a level.
    assert np.abs(pixels(image) - pixels(face_picture())).max() <= 1


def test_gfpgan_visibility_blends_the_restored_faces_in(ctx, restorers):
    source = pixels(face_picture())
    full, line = run(ctx, restorers, gfpgan_visibility=1)
    assert line == "GFPGAN visibility: 1"
    changed = np.abs(pixels(full) - source).sum(2) > 0
    assert changed[50:110, 50:110].mean() > 0.9  # the face is the network's
    assert not changed[:25].any() and not changed[135:].any() and not changed[:, :25].any()  # nothing beyond its crop
    blended, line = run(ctx, restorers, gfpgan_visibility=0.5)
    assert line == "GFPGAN visibility: 0.5"
    assert np.array_equal(pixels(blended), pixels(Image.blend(face_picture(), full, 0.5)))


def test_codeformer_gets_its_weight_and_is_written_down(ctx, restorers):
    codeformer = restorers.stand_ins["CodeFormer"]
    strong, line = run(ctx, restorers, codeformer_visibility=1, codeformer_weight=0)
    assert line == "CodeFormer visibility: 1, CodeFormer weight: 0"
    weak, line = run(ctx, restorers, codeformer_visibility=0.25, codeformer_weight=0.75)
    assert line == "CodeFormer visibility: 0.25, CodeFormer weight: 0.75"
    assert codeformer.weights[-2:] == [0.0, 0.75]
    at_weak = restorers.restore(face_picture(), CODEFORMER, 0.75)
    assert np.array_equal(pixels(weak), pixels(Image.blend(face_picture(), at_weak, 0.25)))
    assert not np.array_equal(pixels(strong), pixels(at_weak))


def test_faces_are_restored_after_upscaling_gfpgan_first(ctx, restorers):
    """A1111's order: its Upscale, GFPGAN and CodeFormer scripts run as their `order` (1000, 2000, 3000) says."""
    image, line = run(ctx, restorers, upscaler_1="Lanczos", upscaling_resize=2, gfpgan_visibility=1, codeformer_visibility=1,
                      codeformer_weight=0.5)
    assert line == ("Postprocess upscale by: 2, Postprocess upscaler: Lanczos, "
                    "GFPGAN visibility: 1, CodeFormer visibility: 1, CodeFormer weight: 0.5")
    upscaled = face_picture().resize((2 * SIDE, 2 * SIDE), Image.Resampling.LANCZOS)
    expected = restorers.restore(restorers.restore(upscaled, GFPGAN), CODEFORMER, 0.5)
    assert image.size == (2 * SIDE, 2 * SIDE) and np.array_equal(pixels(image), pixels(expected))


def test_saved_picture_keeps_its_parameters_and_adds_the_line(ctx, restorers):
    source = Image.open(io.BytesIO(storage.png_bytes(face_picture(), "a face\nSteps: 4, Seed: 1")))
    result = extras.run(ctx, ExtrasRequest(gfpgan_visibility=0.5), [ExtrasInput(source, "face")], restorers=restorers)
    saved = Image.open(result.paths[0])
    assert saved.info == {"parameters": "a face\nSteps: 4, Seed: 1", "postprocessing": "GFPGAN visibility: 0.5",
                          "extras": "GFPGAN visibility: 0.5"}


# ---- API ---------------------------------------------------------------------------------------


def client_on(ctx) -> TestClient:
    app = FastAPI()
    routes.install(app, ctx)
    return TestClient(app)


def b64(image: Image.Image) -> str:
    return base64.b64encode(storage.png_bytes(image, None)).decode()


def test_api_goes_through_the_users_files(ctx):
    """The real networks and helper from models/; the detector, random, finds no face, so the
    picture comes back as it was, with the line A1111 writes."""
    body = {"image": b64(face_picture()), "gfpgan_visibility": 0.5, "codeformer_visibility": 1, "codeformer_weight": 0.25}
    r = client_on(ctx).post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["html_info"] == "<p>GFPGAN visibility: 0.5, CodeFormer visibility: 1, CodeFormer weight: 0.25</p>"
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    assert np.array_equal(pixels(image), pixels(face_picture()))


@pytest.mark.parametrize("body, words", [
    ({"gfpgan_visibility": 0.5}, "GFPGAN model file (such as GFPGANv1.4.pth"),
    ({"codeformer_visibility": 1}, "CodeFormer model file (such as codeformer-v0.1.0.pth)"),
    ({"gfpgan_visibility": 1.5}, "gfpgan_visibility must be a number from 0 to 1"),
    ({"codeformer_weight": -1}, "codeformer_weight must be a number from 0 to 1"),
])
def test_api_refusals_name_the_folder_or_the_field(tmp_path, body, words):
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    r = client_on(ctx).post("/sdapi/v1/extra-single-image", json={"image": b64(face_picture(32)), **body})
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    if "model file" in words:
        assert str(tmp_path / "models") in r.json()["detail"]
