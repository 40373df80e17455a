"""Checkpoint files: detection of family and sizes, .safetensors and .ckpt loading, refusals, hashes."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from modules.models import detect, loader
from modules.models.sd_model import build_model
from tests.tiny import tiny_sd_model, tiny_spec


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_model(seed=3)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _same_outputs(a, b) -> bool:
    """Weights are compared bit for bit elsewhere; outputs may differ in the last float bits
    because memory-mapped tensors have another alignment, which changes the CPU kernels'
    summation order."""
    return all(torch.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(_outputs(a), _outputs(b)))


def _outputs(model) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    tokens = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        context = model.encode_text(tokens)[0]
        return context, model.apply_model(x, torch.tensor([500.0]), context), model.decode_first_stage(x)


# ---- detection ----------------------------------------------------------------------------------


def _unet_sizes(spec) -> dict:
    """The UNet arguments with attention levels as a set: only membership matters to the UNet."""
    return {**spec.unet, "attention_resolutions": set(spec.unet["attention_resolutions"])}


def test_detects_sd15_sizes_from_shapes():
    sd15 = detect.sd15_spec()
    spec = detect.detect(_shapes(build_model(sd15, device="meta")))
    assert spec.family == "SD1"
    assert _unet_sizes(spec) == _unet_sizes(sd15) and spec.vae == sd15.vae and spec.text == sd15.text
    assert (spec.resolution, spec.scale_factor, spec.prediction) == (512, 0.18215, "eps")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"unet": {"in_channels": 9}, "family": "SD1 inpainting"},
        {"unet": {"channel_mult": (1, 2, 3), "attention_resolutions": (1, 4), "num_res_blocks": 2}},
        {"unet": {"transformer_depth": 2, "use_linear_in_transformer": True}},
        {"vae": {"ch_mult": (1, 2), "num_res_blocks": 2}},
        {"text": {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 1}, "unet": {"context_dim": 64}},
    ],
)
def test_detection_recovers_the_sizes_it_was_built_with(overrides):
    spec = tiny_spec(**overrides)
    found = detect.detect(_shapes(build_model(spec, device="meta")))
    assert found.family == spec.family
    assert _unet_sizes(found) == _unet_sizes(spec)
    assert found.vae == spec.vae
    assert found.text == spec.text


def test_metadata_sets_resolution_scale_and_prediction():
    shapes = _shapes(build_model(tiny_spec(), device="meta"))
    spec = detect.detect(shapes, {"resolution": "64", "scale_factor": "0.3", "prediction": "v"})
    assert (spec.resolution, spec.scale_factor, spec.prediction) == (64, 0.3, "v")
    with pytest.raises(detect.DetectionError, match="metadata"):
        detect.detect(shapes, {"resolution": "big"})


@pytest.mark.parametrize(
    "keys, words",
    [
        (["model.diffusion_model.joint_blocks.0.x.weight"], "Stable Diffusion 3 checkpoint, which is not supported yet"),
        (["double_blocks.0.img_attn.qkv.weight"], "Flux checkpoint, which is not supported yet"),
        (["model.diffusion_model.input_blocks.0.0.weight", "depth_model.model.x"], "Stable Diffusion 2 depth"),
        (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "put it in models/Lora"),
        (["encoder.conv_in.weight", "decoder.conv_in.weight"], "put it in models/VAE"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "put it in models/Lora"),
        (["some.other.weight"], "not a Stable Diffusion checkpoint"),
    ],
)
def test_other_files_get_a_message_saying_what_they_are(keys, words):
    with pytest.raises(detect.DetectionError, match=words):
        detect.detect(dict.fromkeys(keys, (1,)))


def test_a_missing_tensor_is_reported_as_damage():
    shapes = _shapes(build_model(tiny_spec(), device="meta"))
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(detect.DetectionError, match="out.2.weight.*damaged"):
        detect.detect(shapes)


# ---- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(_state(tiny), path)
    else:
        torch.save({"state_dict": _state(tiny), "global_step": 10}, path)  # Lightning's nesting
    loaded = loader.load_checkpoint(path)
    assert loaded.spec.family == "SD1"
    ours, theirs = loaded.state_dict(), tiny.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _same_outputs(loaded, tiny)
    assert not any(b.is_meta for b in loaded.buffers())


def test_half_precision_files_load_as_stored(tmp_path, tiny):
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in _state(tiny).items()}, path)
        loaded = loader.load_checkpoint(path)
        assert loaded.unet.out[2].weight.dtype == dtype
        assert torch.equal(loaded.unet.out[2].weight, tiny.unet.out[2].weight.to(dtype))


def test_training_leftovers_and_ema_copies_are_ignored(tmp_path, tiny):
    state = _state(tiny)
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.diffusion_modelout2weight"] = torch.zeros_like(state["model.diffusion_model.out.2.weight"])
    state["loss.discriminator.main.0.weight"] = torch.zeros(3)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = loader.load_checkpoint(path)
    assert torch.equal(loaded.unet.out[2].weight, tiny.unet.out[2].weight)


def test_a_unet_kept_only_as_its_ema_copy_is_restored():
    meta = build_model(detect.sd15_spec(), device="meta")
    tensors = {}
    for key, value in meta.state_dict().items():
        stored = loader._ema_key(key) if key.startswith(detect.UNET) else key
        tensors[stored] = torch.empty(value.shape, device="meta")
    weights = loader.network_weights(tensors)
    assert set(weights) == set(meta.state_dict())


def test_separate_vae_file_replaces_the_checkpoints(tmp_path, tiny):
    ckpt = tmp_path / "model.safetensors"
    save_file(_state(tiny), ckpt)
    other = tiny_sd_model(seed=9)
    vae_file = tmp_path / "other.vae.pt"
    # A1111's VAE files: bare encoder/decoder keys, often with a discriminator beside them.
    vae_state = {k.removeprefix("first_stage_model."): v for k, v in _state(other).items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": {**vae_state, "loss.logvar": torch.zeros(())}}, vae_file)
    loaded = loader.load_checkpoint(ckpt, vae_path=vae_file)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, other.vae.decoder.conv_out.weight)
    assert torch.allclose(_outputs(loaded)[2], _outputs(other)[2], rtol=0, atol=1e-5)
    assert not torch.allclose(_outputs(loaded)[2], _outputs(tiny)[2], rtol=0, atol=1e-3)
    assert torch.equal(loaded.unet.out[2].weight, tiny.unet.out[2].weight)
    not_vae = tmp_path / "bad.vae.safetensors"
    save_file({"x": torch.zeros(1)}, not_vae)
    with pytest.raises(loader.CheckpointError, match="bad.vae.safetensors: no VAE weights"):
        loader.load_checkpoint(ckpt, vae_path=not_vae)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path, tiny):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _state(tiny), "payload": _RunsCode(marker)}, path)
    with pytest.raises(loader.CheckpointError, match="evil.ckpt was refused: it names posix.system.*Nothing in it was run"):
        loader.load_checkpoint(path)
    assert not marker.exists()
    # A plain pickle (not torch's zip format) with the same payload is refused too.
    legacy = tmp_path / "evil-legacy.ckpt"
    legacy.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(loader.CheckpointError):
        loader.load_checkpoint(legacy)
    assert not marker.exists()


class ModelCheckpoint:
    """Pickled under the name of PyTorch Lightning's callback class, as SD 1.x training wrote it."""

    def __init__(self):
        self.best_model_path = "/somewhere/last.ckpt"


def test_lightning_callback_objects_are_tolerated(tmp_path, tiny, monkeypatch):
    """Many SD 1.x .ckpt files pickle a Lightning ModelCheckpoint callback beside the weights."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)
    fake.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setattr(ModelCheckpoint, "__module__", name)
    with monkeypatch.context() as m:  # importable only while saving, as on the machine that trained it
        for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            m.setitem(sys.modules, parent, types.ModuleType(parent))
        m.setitem(sys.modules, name, fake)
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": _state(tiny), "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert name.encode() in data
    loaded = loader.load_checkpoint(path)
    assert _same_outputs(loaded, tiny)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "not a readable"),
        (b"\x00" * 100, "not a readable"),
        (b"this is text, not a checkpoint", "not a readable"),
    ],
)
def test_broken_files_get_a_message_naming_them(tmp_path, content, words):
    for suffix in (".safetensors", ".ckpt"):
        path = tmp_path / f"broken{suffix}"
        path.write_bytes(content)
        with pytest.raises(loader.CheckpointError, match=f"broken{suffix}: {words}"):
            loader.load_checkpoint(path)


def test_truncated_and_wrong_files(tmp_path, tiny):
    path = tmp_path / "cut.safetensors"
    save_file(_state(tiny), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(loader.CheckpointError, match="cut.safetensors"):
        loader.load_checkpoint(path)
    partial = tmp_path / "partial.safetensors"
    state = _state(tiny)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    save_file(state, partial)
    with pytest.raises(loader.CheckpointError, match="partial.safetensors: .*lacks 1 weights: .*in_layers.0.weight"):
        loader.load_checkpoint(partial)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(loader.CheckpointError, match="notes.txt: unknown file type"):
        loader.load_checkpoint(text)


# ---- hashes -------------------------------------------------------------------------------------


def test_model_hash_is_a1111s_short_sha256_and_is_cached(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights" * 1000)
    cache = tmp_path / "cache" / "hashes.json"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loader.model_hash(path, cache) == expected[:10]
    assert cache.is_file()
    calls = []
    monkeypatch.setattr(loader, "sha256_of", lambda p: calls.append(p) or "0" * 64)
    assert loader.model_hash(path, cache) == expected[:10]  # from the cache
    assert calls == []
    os.utime(path, ns=(1, 1))  # a new version of the file: hashed again
    assert loader.model_hash(path, cache) == "0" * 10
    assert len(calls) == 1


def test_lowvram_block_streaming_leaves_the_unet_output_unchanged(tiny_data_dir):
    """The lowvram hooks move each UNet block in for its own forward and out after it, and do
    nothing else: the output equals the plain model's. The CPU stands in for the GPU here."""
    from modules.app.config import Paths
    from modules.models.memory import DevicePolicy, ModelManager

    policy = DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, "lowvram")
    streamed = ModelManager(Paths(tiny_data_dir), policy).get()
    plain = tiny_sd_model(seed=0)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(streamed.apply_model(x, t, context), plain.apply_model(x, t, context))


SHIPPED = "builtin-shapes.safetensors"


def test_a_new_data_folder_lists_and_generates_with_the_shipped_model(tmp_path):
    from modules.app.config import Flags
    from modules.context import AppContext
    from modules.generation import pipeline
    from modules.generation.request import GenerationRequest

    ctx = AppContext.create(Flags(data_dir=tmp_path / "fresh", device="cpu"))
    assert [c.title for c in ctx.models.checkpoints()] == [SHIPPED]
    assert ctx.models.default_checkpoint().path == ctx.paths.shipped_checkpoints / SHIPPED
    request = GenerationRequest(prompt="a large red circle on a blue background", width=64, height=64, steps=4, seed=1)
    result = pipeline.generate(ctx, request, save=True)
    assert "Model: builtin-shapes" in result.infotexts[0]
    assert result.paths[0].is_relative_to(tmp_path / "fresh" / "outputs")  # the data folder, not the checkout


def test_the_data_folders_own_checkpoints_come_first_and_win_a_shared_name(tiny_data_dir, tmp_path):
    import shutil

    from modules.app.config import Paths
    from modules.models.memory import DevicePolicy, ModelManager

    policy = DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, "none")
    listed = ModelManager(Paths(tiny_data_dir), policy).checkpoints()
    assert [c.title for c in listed] == ["tiny.safetensors", SHIPPED]
    assert ModelManager(Paths(tiny_data_dir), policy).default_checkpoint().title == "tiny.safetensors"
    own = tmp_path / "models" / "Stable-diffusion"
    own.mkdir(parents=True)
    shutil.copy(tiny_data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", own / SHIPPED)
    assert [(c.title, c.path) for c in ModelManager(Paths(tmp_path), policy).checkpoints()] == [(SHIPPED, own / SHIPPED)]
