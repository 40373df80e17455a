"""The precision policy: which dtype the model runs in on which machine, and that bfloat16 on a CPU
gives finite pictures close to float32's."""

import numpy as np
import pytest
import torch

from modules.app.config import Flags, parse_flags
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models.memory import DevicePolicy


def policy(fast_bf16: bool, **flags) -> DevicePolicy:
    return DevicePolicy.from_flags(Flags(device="cpu", **flags), fast_bf16=lambda: fast_bf16)


def test_a_cpu_with_bfloat16_instructions_runs_in_bfloat16():
    chosen = policy(True)
    assert (chosen.dtype, chosen.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    assert chosen.reason.startswith("bfloat16 on cpu: ") and "AVX-512 BF16 or AMX" in chosen.reason


def test_a_cpu_without_them_runs_in_float32():
    chosen = policy(False)
    assert (chosen.dtype, chosen.vae_dtype) == (torch.float32, torch.float32)
    assert "no bfloat16 instructions" in chosen.reason


def test_no_half_forces_float32_whatever_else_is_asked():
    for flags in ({"no_half": True}, {"no_half": True, "precision": "bf16"}):
        chosen = policy(True, **flags)
        assert (chosen.dtype, chosen.vae_dtype) == (torch.float32, torch.float32) and "--no-half" in chosen.reason


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_flag_chooses_explicitly(precision, dtype):
    for fast in (True, False):
        chosen = policy(fast, precision=precision)
        assert chosen.dtype == dtype and "--precision" in chosen.reason


def test_no_half_vae_keeps_only_the_vae_in_float32():
    chosen = policy(True, no_half_vae=True)
    assert (chosen.dtype, chosen.vae_dtype) == (torch.bfloat16, torch.float32) and "--no-half-vae" in chosen.reason


def test_a_gpu_runs_in_float16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = DevicePolicy.from_flags(Flags(device="cuda"), fast_bf16=lambda: True)
    assert (chosen.dtype, chosen.vae_dtype, chosen.upscaler_dtype) == (torch.float16,) * 3
    assert chosen.reason.startswith("float16 on cuda")
    assert DevicePolicy.from_flags(Flags(device="cuda", precision="bf16")).dtype == torch.bfloat16


def test_upscalers_stay_in_float32_on_a_cpu():
    assert policy(True).upscaler_dtype == torch.float32


def test_precision_flags_are_parsed_and_checked(capsys):
    assert parse_flags(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parse_flags(["--precision", "fp8"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--precision fp8"):
        DevicePolicy.from_flags(Flags(device="cpu", precision="fp8"))


def test_the_loaded_model_is_in_the_policys_precision(data_dir):
    ctx = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="bf16", no_half_vae=True))
    model = ctx.models.get()
    assert {p.dtype for p in model.model.parameters()} == {p.dtype for p in model.text_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.first_stage_model.parameters()} == {torch.float32}
    # The noise schedule keeps float32: in bfloat16 its values near 1 would round to 1.
    assert model.alphas_cumprod.dtype == torch.float32 and bool((model.alphas_cumprod < 1).all())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_bfloat16_pictures_are_finite_and_close_to_float32s(tmp_path):
    import shutil
    from pathlib import Path

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shipped = Path(__file__).resolve().parent.parent / "models" / "Stable-diffusion" / "builtin-shapes.safetensors"
    shutil.copyfile(shipped, folder / shipped.name)
    request = GenerationRequest(prompt="a large red star in the top left corner on a blue background", width=64, height=64,
                                steps=12, seed=11, batch_size=2, sampler_name="DPM++ 2M")
    pictures = {}
    for precision in ("fp32", "bf16"):
        ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu", precision=precision))
        result = pipeline.generate(ctx, request, save=False)
        pictures[precision] = np.stack([np.asarray(image) for image in result.images])
    assert not np.array_equal(pictures["fp32"], pictures["bf16"])  # bfloat16 was really used
    assert psnr(pictures["fp32"], pictures["bf16"]) > 25


def test_sdxl_and_its_refiner_run_in_bfloat16(tmp_path):
    from safetensors.torch import save_file

    from tests.tiny import tiny_family_model

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for name, family in (("xl", "SDXL"), ("xl-refiner", "SDXL refiner")):
        state = {k: v.contiguous() for k, v in tiny_family_model(family, seed=1).state_dict().items()}
        save_file(state, folder / f"{name}.safetensors", metadata={"resolution": "64"})
    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu", precision="bf16"))
    request = GenerationRequest(prompt="a castle", width=64, height=64, steps=4, seed=2, checkpoint="xl",
                                refiner_checkpoint="xl-refiner", refiner_switch_at=0.5)
    picture = np.asarray(pipeline.generate(ctx, request, save=False).images[0])
    assert ctx.models.get("xl").model.diffusion_model.label_emb[0][0].weight.dtype == torch.bfloat16
    assert picture.std() > 1  # a picture, not a flat (black) one


def overflow_the_unet(model, factor: float = 1e4) -> None:
    """Scales the UNet's last convolution so that its output passes float16's largest value
    (65504) while its weights still fit in float16, as a real half-precision overflow does."""
    with torch.no_grad():
        last = model.model.diffusion_model.out[-1]
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    assert bool(torch.isfinite(last.weight).all())


def test_a_unet_overflow_in_half_precision_is_refused_with_a_clear_message(data_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api import routes
    from modules.app.errors import RequestError

    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=3, seed=5)
    ctx = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="fp16"))
    overflow_the_unet(ctx.models.get())
    with pytest.raises(RequestError, match="overflowed float16.*--no-half"):
        pipeline.generate(ctx, request, save=True)
    assert not list(ctx.paths.outputs.rglob("*.png"))  # no black picture saved

    app = FastAPI()
    routes.install(app, ctx)
    with TestClient(app) as client:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3})
        assert answer.status_code == 422 and "--no-half" in answer.json()["detail"]
        assert client.get("/sdapi/v1/progress").status_code == 200  # the server goes on
    assert not list(ctx.paths.outputs.rglob("*.png"))

    # The same weights in float32: the values fit, and the picture is made.
    ctx32 = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="fp32"))
    overflow_the_unet(ctx32.models.get())
    result = pipeline.generate(ctx32, request, save=True)
    assert len(result.paths) == 1 and result.paths[0].is_file()


def test_nan_weights_in_float32_are_named_as_the_weights_fault(data_dir):
    from modules.app.errors import RequestError

    ctx = AppContext.create(Flags(data_dir=data_dir, device="cpu", precision="fp32"))
    with torch.no_grad():
        ctx.models.get().model.diffusion_model.out[-1].bias.fill_(float("nan"))
    with pytest.raises(RequestError, match="float32.*LoRA"):
        pipeline.generate(ctx, GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=2, seed=1), save=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_both_half_precision_fallbacks(data_dir, device):
    """In float16: a UNet overflow stops the job with its message, and a VAE overflow decodes
    again in float32 and gives a picture."""
    from modules.app.errors import RequestError

    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=3, seed=5)
    ctx = AppContext.create(Flags(data_dir=data_dir, device=device, precision="fp16"))
    assert ctx.models.policy.dtype == torch.float16
    model = ctx.models.get()
    overflow_the_unet(model)
    with pytest.raises(RequestError, match="overflowed float16.*--no-half"):
        pipeline.generate(ctx, request, save=False)
    overflow_the_unet(model, 1e-4)  # back to the checkpoint's values

    decoder = model.first_stage_model.decoder
    with torch.no_grad():
        decoder.conv_in.weight.mul_(1e4)
        decoder.conv_in.bias.mul_(1e4)
    picture = np.asarray(pipeline.generate(ctx, request, save=False).images[0])
    assert model.first_stage_model.dtype == torch.float32 and picture.std() > 0
