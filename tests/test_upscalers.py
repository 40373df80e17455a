"""Upscalers: every table entry gives the asked size, a network file dropped in models/ESRGAN
loads through spandrel and upscales, tiles give the untiled result, and bad files are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modules.postprocess import upscalers
from modules.postprocess.upscalers import BUILTIN, LATENT_UPSCALE_MODES, Tiling, UpscalerError, Upscalers


def picture(width=20, height=14, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_esrgan_state(scale=2, seed=0) -> dict[str, torch.Tensor]:
    """An RRDB (ESRGAN) network with 8 features and one block: the key layout of real ESRGAN files."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict().items()}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "ESRGAN").mkdir()
    save_file(tiny_esrgan_state(), root / "ESRGAN" / "2x-tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def table(models_root):
    return Upscalers(models_root)


@pytest.mark.parametrize("entry", BUILTIN, ids=lambda u: u.name)
@pytest.mark.parametrize("size", [(40, 28), (31, 9), (10, 7)])
def test_builtin_upscalers_give_the_asked_size(table, entry, size):
    assert table.upscale(picture(), entry.name, *size).size == size


def test_nearest_repeats_pixels_and_lanczos_interpolates(table):
    source = picture(6, 4)
    nearest = np.asarray(table.upscale(source, "Nearest", 12, 8))
    assert (nearest[::2, ::2] == np.asarray(source)).all() and (nearest[1::2, 1::2] == np.asarray(source)).all()
    lanczos = np.asarray(table.upscale(source, "Lanczos", 12, 8))
    assert not (lanczos == nearest).all()


@pytest.mark.parametrize("mode", LATENT_UPSCALE_MODES, ids=lambda m: m.name)
def test_latent_modes_give_the_asked_size(mode):
    latent = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    out = upscalers.upscale_latent(latent, mode, 16, 12)
    assert out.shape == (2, 4, 16, 12)
    if "nearest" in mode.name:  # an exact 2x of nearest neighbours repeats every cell
        assert torch.equal(out[:, :, ::2, ::2], latent)
    assert upscalers.find_latent_mode(mode.name) is mode


def test_antialiasing_changes_a_downscale():
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    plain, smooth = (upscalers.upscale_latent(latent, upscalers.find_latent_mode(n), 5, 5) for n in ("Latent", "Latent (antialiased)"))
    assert not torch.allclose(plain, smooth)
    assert upscalers.find_latent_mode("Latent (sideways)") is None


def test_network_file_is_listed_with_its_folder_and_scale(table, models_root):
    network = table.find("2x-tiny")
    assert (network.folder, network.path, network.scale) == ("ESRGAN", models_root / "ESRGAN" / "2x-tiny.safetensors", 2.0)
    assert table.names()[:3] == ["None", "Lanczos", "Nearest"]
    with pytest.raises(LookupError, match="2x-tiny"):
        table.find("4x-missing")


def test_network_runs_the_network(table):
    source = picture(12, 10)
    out = table.upscale(source, "2x-tiny", 24, 20, Tiling(0, 0))
    descriptor = table.network(table.find("2x-tiny"))
    assert descriptor.architecture.name == "ESRGAN" and descriptor.scale == 2
    with torch.inference_mode():
        direct = upscalers.tensor_to_image(descriptor(upscalers.image_to_tensor(source)))
    assert np.array_equal(np.asarray(out), np.asarray(direct))
    assert not np.array_equal(np.asarray(out), np.asarray(table.upscale(source, "Lanczos", 24, 20)))


@pytest.mark.parametrize("size", [(24, 20), (48, 40), (30, 25), (10, 8)])
def test_network_reaches_any_size(table, size):
    """2x twice for 4x, then a Lanczos step to sizes that are no power of the network's scale."""
    assert table.upscale(picture(12, 10), "2x-tiny", *size, Tiling(0, 0)).size == size


def test_tiles_give_the_untiled_result(table):
    descriptor = table.network(table.find("2x-tiny"))
    x = upscalers.image_to_tensor(picture(50, 37, seed=3))
    with torch.inference_mode():
        whole = descriptor(x)
        tiled = upscalers.tiled(descriptor, x, 2, tile=16, overlap=16)
        seams = upscalers.tiled(descriptor, x, 2, tile=16, overlap=0)
    assert tiled.shape == whole.shape == (1, 3, 74, 100)
    assert (tiled - whole).abs().max() < 1e-4
    assert (seams - whole).abs().max() > 1e-2  # without context the tiles really differ at their edges
    big = picture(40, 30, seed=4)
    assert np.abs(np.asarray(table.upscale(big, "2x-tiny", 80, 60, Tiling(16, 16)), dtype=int)
                  - np.asarray(table.upscale(big, "2x-tiny", 80, 60, Tiling(0, 0)), dtype=int)).max() <= 1


def test_pth_files_load_through_the_weights_only_unpickler(tmp_path):
    (tmp_path / "RealESRGAN").mkdir()
    # Real-ESRGAN's own files nest the weights under "params_ema".
    torch.save({"params_ema": tiny_esrgan_state(scale=4, seed=1)}, tmp_path / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    table = Upscalers(tmp_path)
    assert table.find("RealESRGAN_x4plus").scale == 4.0
    assert table.network(table.find("RealESRGAN_x4plus")).scale == 4
    assert table.upscale(picture(8, 6), "RealESRGAN_x4plus", 32, 24).size == (32, 24)


@pytest.mark.parametrize("name, scale", [("4x-UltraSharp", 4), ("2xNomosUni", 2), ("RealESRGAN_x2plus", 2), ("ESRGAN_8x", 8),
                                         ("1x_ITF_SkinDiffDetail", 1), ("BoxSmoother", 4)])
def test_listed_scale_comes_from_the_file_name(tmp_path, name, scale):
    assert upscalers.Upscaler(name, path=tmp_path / f"{name}.pth").scale == scale


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params": tiny_esrgan_state(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(UpscalerError, match="refused"):
        upscalers.read_network(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, words",
    [
        ({"some.weight": torch.zeros(3, 3)}, "not an architecture that spandrel knows"),
        ({"model.0.weight": torch.zeros(8, 3, 3, 3), "model.1.sub.0.RDB1.conv1.0.weight": torch.zeros(2)}, "do not fit"),
    ],
)
def test_files_that_are_no_upscaler_say_so(tmp_path, content, words):
    path = tmp_path / "odd.safetensors"
    save_file(content, path)
    with pytest.raises(UpscalerError, match=words):
        upscalers.read_network(path)


def test_damaged_file_says_so(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tiny_esrgan_state(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UpscalerError, match="cut.safetensors"):
        upscalers.read_network(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_on_the_gpu_in_half_precision_matches_the_cpu(models_root):
    source = picture(40, 30, seed=5)
    on_cpu = Upscalers(models_root).upscale(source, "2x-tiny", 80, 60, Tiling(0, 0))
    on_gpu = Upscalers(models_root, "cuda", torch.float16).upscale(source, "2x-tiny", 80, 60, Tiling(16, 16))
    assert np.abs(np.asarray(on_gpu, dtype=int) - np.asarray(on_cpu, dtype=int)).max() <= 3
