"""The model families: their real checkpoints' keys, detection, and every feature working on tiny
SD 2.x, SDXL (base, inpainting) and SDXL refiner checkpoints in the original key layouts."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modules.app.config import Flags
from modules.app.errors import RequestError
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.models import detect, loader, merger
from modules.models.sd_model import build_model, scaled_linear_alphas_cumprod
from modules.networks.embeddings import EmbeddingDatabase
from modules.prompting.conditioning import encode_prompts
from modules.training import textual_inversion as ti
from tests.tiny import tiny_family_model

KEY_LISTS = Path(__file__).parent / "data" / "model_keys"
# (key-list file, family, inpainting) of each released model the key lists stand for.
RELEASED = [("sd1", "SD1", False), ("sd2", "SD2", False), ("sd2_inpainting", "SD2", True),
            ("sdxl_base", "SDXL", False), ("sdxl_inpainting", "SDXL", True), ("sdxl_refiner", "SDXL refiner", False)]
# Rebuilt by the text encoder from its length, so not kept (see text_encoders.POSITION_IDS_KEY).
POSITION_IDS = "text_model.embeddings.position_ids"


def key_list(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((KEY_LISTS / f"{name}.json").read_text())["keys"].items()}


def shapes(spec) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the model `spec` builds, allocating nothing."""
    return {k: tuple(v.shape) for k, v in build_model(spec, device="meta").state_dict().items()}


# ---- the real checkpoints' keys -------------------------------------------------------------------


@pytest.mark.parametrize("name, family, inpainting", RELEASED)
def test_full_size_model_has_exactly_the_released_files_keys(name, family, inpainting):
    ours = shapes(detect.full_size_spec(family, inpainting))
    theirs = {k: v for k, v in key_list(name).items() if not k.endswith(POSITION_IDS)}
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}


@pytest.mark.parametrize("name, family, inpainting", RELEASED)
def test_released_files_are_detected_as_their_family(name, family, inpainting):
    spec = detect.detect(key_list(name))
    assert spec.family == family + (" inpainting" if inpainting else "")
    assert shapes(spec) == shapes(detect.full_size_spec(family, inpainting))
    expected = {"SD1": ("eps", 512, 0.18215, None), "SD2": ("v", 768, 0.18215, None),
                "SDXL": ("eps", 1024, 0.13025, "sdxl"), "SDXL refiner": ("eps", 1024, 0.13025, "refiner")}[family]
    if family == "SD2" and inpainting:
        expected = ("eps", 512, 0.18215, None)  # 512-inpainting-ema
    assert (spec.prediction, spec.resolution, spec.scale_factor, spec.vector) == expected


def test_sdxl_encoders_are_read_off_the_keys():
    text = detect.detect(key_list("sdxl_base")).text
    assert [(e.prefix, e.kind, e.name, e.width, e.pooled) for e in text] == [
        ("conditioner.embedders.0", "clip", "clip_l", 768, False), ("conditioner.embedders.1", "openclip", "clip_g", 1280, True)]
    assert (text[1].size["layers"], text[1].size["heads"], text[1].size["embed_dim"]) == (32, 20, 1280)


# ---- what the keys cannot show ------------------------------------------------------------------

LDM_V_CONFIG = {"model": {"params": {"parameterization": "v", "scale_factor": 0.18215, "unet_config": {
    "params": {"image_size": 96, "num_head_channels": 64}}}}}
SGM_V_CONFIG = {"model": {"params": {
    "scale_factor": 0.13025,
    "denoiser_config": {"params": {"scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"}}},
    "network_config": {"params": {"num_head_channels": 64}}}}}


def test_configs_say_what_the_weights_cannot():
    assert detect.config_overrides(LDM_V_CONFIG) == {"prediction": "v", "scale_factor": 0.18215, "resolution": 768,
                                                     "unet": {"num_head_channels": 64}}
    assert detect.config_overrides(SGM_V_CONFIG) == {"prediction": "v", "scale_factor": 0.13025,
                                                     "unet": {"num_head_channels": 64}}
    eps = {"model": {"params": {"unet_config": {"params": {"image_size": 64, "num_heads": 8}}}}}
    assert detect.config_overrides(eps) == {"resolution": 512, "unet": {"num_heads": 8, "num_head_channels": -1}}
    assert detect.config_overrides({"something": "else"}) == detect.config_overrides(None) == {}


def test_prediction_comes_from_the_config_then_a_v_pred_key_then_metadata_then_the_family():
    sdxl = key_list("sdxl_base")
    assert detect.detect(sdxl).prediction == "eps"
    assert detect.detect(sdxl, {"modelspec.prediction_type": "v"}).prediction == "v"
    marked = {**sdxl, "v_pred": ()}
    assert detect.detect(marked).prediction == "v"
    assert detect.detect(marked, config={"model": {"params": {"parameterization": "eps"}}}).prediction == "eps"
    assert detect.detect(key_list("sd2"), config={"model": {"params": {"parameterization": "eps"}}}).prediction == "eps"


def test_a_config_sets_the_head_width_the_weights_cannot_show():
    spec = detect.detect(key_list("sd1"), config={"model": {"params": {"unet_config": {"params": {"num_head_channels": 64}}}}})
    assert spec.unet["num_head_channels"] == 64


def test_ztsnr_models_get_a_schedule_ending_in_pure_noise():
    spec = detect.detect({**key_list("sdxl_base"), "v_pred": (), "ztsnr": ()})
    assert (spec.prediction, spec.ztsnr) == ("v", True)
    model = build_model(spec, device="meta")
    assert model.alphas_cumprod.device.type == "meta"  # built lazily; the schedule itself:
    from modules.models.sd_model import zero_terminal_snr

    plain = scaled_linear_alphas_cumprod()
    rescaled = zero_terminal_snr(plain)
    assert rescaled[-1].item() == pytest.approx(4.8973451890853435e-08)
    assert rescaled[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert bool((rescaled[1:] < rescaled[:-1]).all())


@pytest.mark.parametrize("keys, words", [
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3 checkpoint, which is not supported"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux checkpoint"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "VAE file"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"], "LoRA file"),
])
def test_other_files_are_named(keys, words):
    with pytest.raises(detect.DetectionError, match=words):
        detect.detect(dict.fromkeys(keys, (1,)))


def test_a_damaged_sdxl_file_says_what_is_missing():
    shapes = key_list("sdxl_base")
    del shapes["conditioner.embedders.1.model.text_projection"]
    with pytest.raises(detect.DetectionError, match="SDXL.*text_projection.*damaged"):
        detect.detect(shapes)


# ---- tiny checkpoints in the original layouts ----------------------------------------------------


def save_checkpoint(model, path: Path, dtype=torch.float32, extra: dict | None = None, metadata: dict | None = None) -> Path:
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **(extra or {})}, path, metadata={"resolution": "64", **(metadata or {})})
    return path


@pytest.fixture(scope="module")
def family_ctx(tmp_path_factory):
    """A data folder with tiny SDXL base, SDXL inpainting, SDXL refiner and SD 2.x checkpoints, run
    in float32 so that outputs can be compared with computations of their own."""
    root = tmp_path_factory.mktemp("families")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    # fp16 as released, CLIP's position ids as SDXL files carry them
    save_checkpoint(tiny_family_model("SDXL", seed=1), folder / "xl.safetensors", torch.float16,
                    {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    save_checkpoint(tiny_family_model("SDXL", seed=2), folder / "xl-b.safetensors")
    save_checkpoint(tiny_family_model("SDXL", seed=1, inpainting=True), folder / "xl-inpaint.safetensors")
    save_checkpoint(tiny_family_model("SDXL refiner", seed=3), folder / "xl-refiner.safetensors")
    save_checkpoint(tiny_family_model("SD2", seed=4), folder / "sd2.safetensors")
    (folder / "sd2.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    return AppContext.create(Flags(data_dir=root, device="cpu", precision="fp32"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def txt2img(ctx, checkpoint: str, **fields):
    fields = dict(prompt="a red (circle:1.2) BREAK on blue", negative_prompt="blurry", checkpoint=checkpoint,
                  width=64, height=64, steps=4, seed=7, sampler_name="Euler") | fields
    request = GenerationRequest(**fields)
    return pipeline.generate(ctx, request, save=False)


def test_each_family_loads_as_detected(family_ctx):
    families = {name: family_ctx.models.get(name).spec for name in ("xl", "xl-inpaint", "xl-refiner", "sd2")}
    assert {n: s.family for n, s in families.items()} == {
        "xl": "SDXL", "xl-inpaint": "SDXL inpainting", "xl-refiner": "SDXL refiner", "sd2": "SD2"}
    assert families["sd2"].prediction == "eps"  # from sd2.yaml beside it; the family's default is v


def test_sdxl_txt2img_follows_prompt_seed_and_size(family_ctx):
    first = txt2img(family_ctx, "xl")
    again = txt2img(family_ctx, "xl")
    other_prompt = pipeline.generate(family_ctx, first.request.replace(prompt="a green square"), save=False)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other_prompt.images[0])).max() > 0
    assert "Model: xl" in first.infotexts[0] and "Size: 64x64" in first.infotexts[0]
    wide = txt2img(family_ctx, "xl", width=96)
    assert wide.images[0].size == (96, 64)


def test_sdxl_size_conditioning_and_pooled_text_reach_the_unet(family_ctx):
    model = family_ctx.models.get("xl")
    small = encode_prompts(model, ["a cat"], ["ugly"], 4, 1, size=(64, 64))
    large = encode_prompts(model, ["a cat"], ["ugly"], 4, 1, size=(1024, 768))
    cond_small, cond_large = small.cond[0][0][0], large.cond[0][0][0]
    assert torch.equal(cond_small.at(1), cond_large.at(1))  # the context does not depend on the size
    pooled = cond_small.vector_at(1)[:32]
    assert torch.equal(pooled, cond_large.vector_at(1)[:32]) and not torch.equal(cond_small.vector_at(1), cond_large.vector_at(1))
    assert pooled.abs().sum() > 0 and not torch.equal(pooled, small.uncond[0].vector_at(1)[:32])
    with pytest.raises(ValueError, match="size"):
        encode_prompts(model, ["a cat"], [""], 4, 1)


def test_refiner_vector_carries_the_aesthetic_scores_a1111_uses(family_ctx):
    refiner = family_ctx.models.get("xl-refiner", refiner=True)
    c = encode_prompts(refiner, ["castle"], ["castle"], 4, 1, size=(64, 64))
    positive, negative = c.cond[0][0][0].vector_at(1), c.uncond[0].vector_at(1)
    assert positive.shape == negative.shape == (32 + 5 * 256,)
    assert torch.equal(positive[:-256], negative[:-256]) and not torch.equal(positive[-256:], negative[-256:])
    from modules.models.unet import timestep_embedding

    assert torch.allclose(positive[-256:], timestep_embedding(torch.tensor([6.0]), 256)[0].to(positive.dtype))
    assert torch.allclose(negative[-256:], timestep_embedding(torch.tensor([2.5]), 256)[0].to(negative.dtype))


@pytest.mark.parametrize("name", ["xl", "sd2"])
def test_clip_skip_one_and_two_are_the_penultimate_layer(name):
    model = tiny_family_model("SDXL" if name == "xl" else "SD2", seed=0)
    tokens = torch.randint(0, 49406, (1, 77))
    one, two = (model.encode_text(tokens, skip)[0] for skip in (1, 2))
    for encoder in model.text_encoders:
        encoder.min_skip = 1
    last = model.encode_text(tokens, 1)[0]
    assert torch.equal(one, two) and not torch.equal(two, last)


def test_sdxl_img2img_and_inpainting_with_the_painted_mask(family_ctx):
    picture = Image.new("RGB", (64, 64), (20, 40, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    common = dict(prompt="a red circle", init_images=(picture,), width=64, height=64, steps=4, seed=3, sampler_name="Euler")
    redrawn = pipeline.generate(family_ctx, Img2ImgRequest(checkpoint="xl", denoising_strength=0.6, **common), save=False)
    assert redrawn.images[0].size == (64, 64) and "Denoising strength: 0.6" in redrawn.infotexts[0]
    for checkpoint in ("xl", "xl-inpaint"):
        result = pipeline.generate(family_ctx, Img2ImgRequest(checkpoint=checkpoint, mask=mask, mask_blur=0,
                                                              denoising_strength=1.0, **common), save=False)
        out = pixels(result.images[0])
        assert np.array_equal(out[:8, :8], pixels(picture)[:8, :8])  # outside the mask: the picture itself
        assert np.abs(out[24:40, 24:40] - pixels(picture)[24:40, 24:40]).max() > 0
    assert "Conditional mask weight" in result.infotexts[0]  # the 9-channel model got its conditioning


def test_hires_fix_on_sdxl(family_ctx):
    result = txt2img(family_ctx, "xl", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5)
    assert result.images[0].size == (96, 96) and "Hires upscale: 1.5" in result.infotexts[0]


def test_the_refiner_takes_over_at_the_switch(family_ctx, monkeypatch):
    refiner = family_ctx.models.get("xl-refiner", refiner=True)
    base = family_ctx.models.get("xl")
    calls = {"base": 0, "refiner": 0}
    for name, model in (("base", base), ("refiner", refiner)):
        original = model.apply_model

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, "apply_model", counted)
    plain = txt2img(family_ctx, "xl")
    assert calls == {"base": 4, "refiner": 0}
    refined = txt2img(family_ctx, "xl", refiner_checkpoint="xl-refiner", refiner_switch_at=0.5)
    assert calls == {"base": 6, "refiner": 2}  # Euler: one call a step; steps 3 and 4 on the refiner
    assert np.abs(pixels(refined.images[0]) - pixels(plain.images[0])).max() > 0
    refiner_hash = family_ctx.models.hash_of(refiner.checkpoint)
    assert f"Refiner: xl-refiner [{refiner_hash}], Refiner switch at: 0.5" in refined.infotexts[0]
    never = txt2img(family_ctx, "xl", refiner_checkpoint="xl-refiner", refiner_switch_at=1.0)
    assert np.array_equal(pixels(never.images[0]), pixels(plain.images[0]))


def test_a_refiner_of_another_latent_space_is_refused(family_ctx):
    with pytest.raises(RequestError, match="another latent space"):
        txt2img(family_ctx, "xl", refiner_checkpoint="sd2")


def test_sdxl_embedding_file_puts_its_two_sets_of_vectors_in(family_ctx, tmp_path):
    model = family_ctx.models.get("xl")
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xlstyle.safetensors")
    table = EmbeddingDatabase(tmp_path).table(model.text_width)
    with_embedding = encode_prompts(model, ["xlstyle cat"], [""], 4, 1, embeddings=table, size=(64, 64)).cond[0][0][0]
    plain = encode_prompts(model, ["xlstyle cat"], [""], 4, 1, size=(64, 64)).cond[0][0][0]
    assert not torch.equal(with_embedding.at(1), plain.at(1))
    # The same as placing each encoder's vectors by hand.
    from modules.prompting.conditioning import prompt_chunks

    [chunk], _ = prompt_chunks("xlstyle cat", embeddings=table)
    tokens = torch.tensor([chunk.tokens])
    expected, _ = model.encode_text(tokens, 1, [(0, 1, torch.cat([clip_l, clip_g], dim=1))])
    assert torch.allclose(with_embedding.at(1), expected[0], atol=1e-5)
    assert EmbeddingDatabase(tmp_path).split(32)[1].keys() == {"xlstyle"}  # skipped by a 32-wide SD model


def test_textual_inversion_trains_on_sd2_and_refuses_sdxl(family_ctx, tmp_path):
    sd2 = family_ctx.models.get("sd2")
    path = ti.create_embedding(sd2, tmp_path, "sdtwo", init_text="red", vectors=2)
    vectors, _ = ti.read_embedding(path)
    assert vectors.shape == (2, 32)
    with pytest.raises(ti.TrainingError, match="SD 1.x and 2.x.*SDXL"):
        ti.create_embedding(family_ctx.models.get("xl"), tmp_path, "xlone")


def test_sdxl_vae_overflow_in_half_precision_decodes_again_in_float32(caplog):
    model = tiny_family_model("SDXL", seed=0)
    latent = torch.randn(1, 4, 8, 8)
    reference = model.decode_first_stage(latent)
    with torch.no_grad():
        model.first_stage_model.decoder.conv_in.weight.mul_(1e4)
        model.first_stage_model.decoder.conv_in.bias.mul_(1e4)
    model.first_stage_model.to(torch.float16)
    with torch.no_grad():
        assert not bool(torch.isfinite(model.first_stage_model.decode(latent.half() / model.scale_factor)).all())
        with caplog.at_level(logging.WARNING):
            decoded = model.decode_first_stage(latent.half())
    assert bool(torch.isfinite(decoded).all()) and "float32" in caplog.text
    assert model.first_stage_model.dtype == torch.float32 and reference.shape == decoded.shape
    with torch.no_grad():
        assert torch.equal(decoded, model.first_stage_model.decode(latent.half().float() / model.scale_factor).half())


def test_under_lowvram_an_overflowing_vae_decodes_in_bfloat16(monkeypatch, caplog):
    """bfloat16 has float32's range in half the memory: the policy picks it for the fallback
    where memory is what counts (lowvram on a GPU that computes it)."""
    from modules.app.config import Flags
    from modules.models.memory import DevicePolicy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert DevicePolicy.from_flags(Flags(device="cuda", lowvram=True)).vae_fallback_dtype == torch.bfloat16
    assert DevicePolicy.from_flags(Flags(device="cuda", medvram=True)).vae_fallback_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert DevicePolicy.from_flags(Flags(device="cuda", lowvram=True)).vae_fallback_dtype == torch.float32

    model = tiny_family_model("SDXL", seed=0)
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        model.first_stage_model.decoder.conv_in.weight.mul_(1e4)
        model.first_stage_model.decoder.conv_in.bias.mul_(1e4)
    model.first_stage_model.to(torch.float16)
    model.vae_fallback_dtype = torch.bfloat16
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        decoded = model.decode_first_stage(latent.half())
    assert decoded.dtype == torch.float16 and bool(torch.isfinite(decoded).all())
    assert model.first_stage_model.dtype == torch.bfloat16 and "decoding in bfloat16" in caplog.text


def test_merging_sdxl_then_loading_the_result(family_ctx):
    path = merger.merge(family_ctx, merger.MergeRequest(primary="xl", secondary="xl-b", multiplier=0.5, name="xl-merged"))
    a, b = (loader.read_state_dict(family_ctx.models.find_checkpoint(n).path)[0] for n in ("xl", "xl-b"))
    merged, _ = loader.read_state_dict(path)
    key = "model.diffusion_model.label_emb.0.0.weight"
    assert torch.allclose(merged[key].float(), 0.5 * a[key].float() + 0.5 * b[key].float(), atol=1e-3)
    result = txt2img(family_ctx, "xl-merged")
    assert "Model: xl-merged" in result.infotexts[0]
    path.unlink()


def test_merging_two_families_names_both(family_ctx):
    with pytest.raises(merger.MergeError, match="A is an SDXL model and B an SD2 model"):
        merger.merge(family_ctx, merger.MergeRequest(primary="xl", secondary="sd2", name="mixed"))
    assert not (family_ctx.paths.checkpoints / "mixed.safetensors").exists()


def test_sdxl_lora_from_the_prompt_changes_the_picture_and_is_undone(family_ctx):
    from tests.test_lora import XL_NAMES, kohya_tensors

    model = family_ctx.models.get("xl")
    names = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_add_embedding_linear_1",
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    path = family_ctx.paths.lora / "xlstyle.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_tensors(model, names, table=XL_NAMES), path)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    plain = txt2img(family_ctx, "xl")
    styled = txt2img(family_ctx, "xl", prompt="a red circle <lora:xlstyle:1>")
    unstyled = txt2img(family_ctx, "xl", prompt="a red circle <lora:xlstyle:0>")
    assert np.abs(pixels(styled.images[0]) - pixels(unstyled.images[0])).max() > 0
    assert "Lora hashes: \"xlstyle:" in styled.infotexts[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].data_ptr() == ptr for k, (v, ptr) in before.items())
    assert np.array_equal(pixels(txt2img(family_ctx, "xl").images[0]), pixels(plain.images[0]))
    path.unlink()


def test_api_txt2img_with_a_refiner_and_the_model_list(family_ctx):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api import routes

    app = FastAPI()
    routes.install(app, family_ctx)
    client = TestClient(app)
    body = {"prompt": "a castle", "steps": 4, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "xl"}, "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.75}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Refiner: xl-refiner [" in json.loads(r.json()["info"])["infotexts"][0]
    assert "Refiner switch at: 0.75" in json.loads(r.json()["info"])["infotexts"][0]
    missing = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nowhere"})
    assert missing.status_code in (404, 422) and "nowhere" in missing.text
    bad = client.post("/sdapi/v1/txt2img", json={**body, "refiner_switch_at": 0})
    assert bad.status_code == 422 and "refiner_switch_at" in bad.text
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert models["sd2"]["config"].endswith("sd2.yaml") and models["xl"]["config"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdxl_with_its_refiner_in_half_precision_and_the_low_vram_modes(family_ctx):
    root = family_ctx.paths.root
    pictures = {}
    for mode in ("default", "medvram", "lowvram"):
        flags = Flags(data_dir=root, device="cuda", medvram=mode == "medvram", lowvram=mode == "lowvram")
        ctx = AppContext.create(flags)
        result = txt2img(ctx, "xl", refiner_checkpoint="xl-refiner", refiner_switch_at=0.5)
        assert ctx.models.get("xl").model.diffusion_model.time_embed[0].weight.dtype == torch.float16
        pictures[mode] = pixels(result.images[0])
    assert np.abs(pictures["medvram"] - pictures["default"]).max() <= 2
    assert np.abs(pictures["lowvram"] - pictures["default"]).max() <= 2


def test_a_broken_config_beside_a_checkpoint_is_named_and_nothing_else_breaks(family_ctx, tmp_path):
    folder = family_ctx.paths.checkpoints
    save_checkpoint(tiny_family_model("SD2", seed=5), folder / "sd2-broken.safetensors")
    (folder / "sd2-broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(loader.CheckpointError, match=r"sd2-broken\.yaml: not a readable config"):
        family_ctx.models.get("sd2-broken")
    (folder / "sd2-broken.yaml").write_text("- just\n- a list\n")
    with pytest.raises(loader.CheckpointError, match=r"sd2-broken\.yaml: holds a list"):
        family_ctx.models.get("sd2-broken")
    assert "Model: xl" in txt2img(family_ctx, "xl").infotexts[0]  # the server goes on with other models
    for suffix in (".safetensors", ".yaml"):
        (folder / f"sd2-broken{suffix}").unlink()
