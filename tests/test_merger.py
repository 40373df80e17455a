"""Checkpoint merger: the math checked tensor by tensor on tiny checkpoints, keys present in one
model only, inpainting A, fp16, baked-in VAE, the recipe metadata, refusals, and a merged file
that loads and generates."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from modules.app.config import Flags
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models import loader, merger, safetensors_stream
from modules.models.merger import Info, MergeError, MergeRequest, find_interpolation
from modules.service.jobs import Job
from tests.tiny import tiny_sd_model

M = 0.3


def state(seed: int, **overrides) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_sd_model(seed=seed, **overrides).state_dict().items()}


@pytest.fixture(scope="module")
def states():
    return {"a": state(1), "b": state(2), "c": state(3)}


@pytest.fixture
def ctx(tmp_path, states):
    context = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    for name, tensors in states.items():
        save_file(tensors, context.paths.checkpoints / f"{name}.safetensors", metadata={"resolution": "64"})
    return context


def merged(ctx, **fields) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = merger.merge(ctx, MergeRequest(**{"primary": "a", "secondary": "b", "tertiary": "c", "multiplier": M, **fields}))
    if path.suffix == ".ckpt":
        return loader.read_state_dict(path)
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_weighted_sum_tensor_by_tensor(ctx, states):
    out, _ = merged(ctx, interpolation="Weighted sum", name="ws")
    a, b = states["a"], states["b"]
    assert out.keys() == a.keys()
    for key in a:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], (1 - M) * a[key] + M * b[key], rtol=0, atol=1e-6)


def test_add_difference_tensor_by_tensor(ctx, states):
    out, _ = merged(ctx, interpolation="Add difference", name="ad")
    a, b, c = states["a"], states["b"], states["c"]
    for key in a:
        torch.testing.assert_close(out[key], a[key] + M * (b[key] - c[key]), rtol=0, atol=1e-6)


def test_fp16_output(ctx, states):
    out, _ = merged(ctx, interpolation="Weighted sum", name="half", save_as_half=True)
    a, b = states["a"], states["b"]
    for key in a:
        assert out[key].dtype == torch.float16
        # Both are float32 sums rounded to half; their last float32 bit may differ, so one half step may too.
        torch.testing.assert_close(out[key], ((1 - M) * a[key] + M * b[key]).half(), rtol=1e-3, atol=1e-4)


def test_no_interpolation_as_ckpt_is_a_copy_of_a(ctx, states):
    out, _ = merged(ctx, interpolation="No interpolation", name="copy", checkpoint_format="ckpt", secondary=None, tertiary=None)
    assert out.keys() == states["a"].keys()
    assert all(torch.equal(out[k], v) for k, v in states["a"].items())


def test_recipe_and_run_metadata(ctx):
    _, meta = merged(ctx, interpolation="Add difference", name="recipe")
    assert meta["resolution"] == "64"
    recipe = json.loads(meta["sd_merge_recipe"])
    sha = {n: hashlib.sha256((ctx.paths.checkpoints / f"{n}.safetensors").read_bytes()).hexdigest() for n in "abc"}
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Add difference" and recipe["multiplier"] == M
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"], recipe["tertiary_model_hash"]) == (sha["a"], sha["b"], sha["c"])
    assert recipe["is_inpainting"] is False and recipe["custom_name"] == "recipe"
    models = json.loads(meta["sd_merge_models"])
    assert {v["name"] for v in models.values()} == {"a", "b", "c"} and set(models) == set(sha.values())


def test_merged_file_is_listed_loads_and_generates(ctx):
    path = merger.merge(ctx, MergeRequest(primary="a", secondary="b", multiplier=0.5))
    assert path.name == "0.5(a) + 0.5(b).safetensors"
    assert "0.5(a) + 0.5(b).safetensors" in [c.title for c in ctx.models.checkpoints()]
    model = loader.load_checkpoint(path)
    assert model.spec.resolution == 64
    result = pipeline.generate(ctx, GenerationRequest(prompt="a red circle", steps=2, width=64, height=64, seed=1,
                                                       checkpoint=path.name), save=False)
    assert result.images[0].size == (64, 64)
    assert "Model: 0.5(a) + 0.5(b)" in result.infotexts[0]


def test_keys_in_one_model_only(ctx, states):
    a = {**states["a"], "model.only_in_a": torch.ones(2), "not_merged_in_both": torch.ones(2)}
    b = {**states["b"], "model.only_in_b": torch.full((3,), 5.0), "not_merged_in_both": torch.zeros(2), "ignored_only_in_b": torch.ones(1)}
    save_file(a, ctx.paths.checkpoints / "a2.safetensors")
    save_file(b, ctx.paths.checkpoints / "b2.safetensors")
    out, _ = merged(ctx, primary="a2", secondary="b2", interpolation="Weighted sum", name="odd")
    assert torch.equal(out["model.only_in_a"], torch.ones(2))
    assert torch.equal(out["model.only_in_b"], torch.full((3,), 5.0))
    assert torch.equal(out["not_merged_in_both"], torch.ones(2))  # no "model" in the name: A's, as A1111
    assert "ignored_only_in_b" not in out


def test_inpainting_a_merges_the_first_four_input_channels(ctx, states):
    inpaint = state(4, unet={"in_channels": 9})
    save_file(inpaint, ctx.paths.checkpoints / "inpaint.safetensors", metadata={"resolution": "64"})
    out, meta = merged(ctx, primary="inpaint", interpolation="Add difference", name="mix")
    key = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet input conv, 9 channels in an inpainting model
    b, c = states["b"][key], states["c"][key]
    torch.testing.assert_close(out[key][:, :4], inpaint[key][:, :4] + M * (b - c), rtol=0, atol=1e-6)
    assert torch.equal(out[key][:, 4:], inpaint[key][:, 4:])
    assert json.loads(meta["sd_merge_recipe"])["is_inpainting"] is True
    assert (ctx.paths.checkpoints / "mix.inpainting.safetensors").is_file()
    assert loader.load_checkpoint(ctx.paths.checkpoints / "mix.inpainting.safetensors").spec.family == "SD1 inpainting"
    with pytest.raises(MergeError, match="A must be the inpainting model"):
        merger.merge(ctx, MergeRequest(primary="a", secondary="inpaint", name="wrong"))


def test_baked_in_vae_replaces_the_autoencoder(ctx, states):
    vae = {k.removeprefix("first_stage_model."): v for k, v in state(9).items() if k.startswith("first_stage_model.")}
    ctx.paths.vae.mkdir(parents=True, exist_ok=True)
    save_file(vae, ctx.paths.vae / "better.vae.safetensors")
    out, meta = merged(ctx, interpolation="Weighted sum", name="baked", bake_in_vae="better.vae.safetensors", save_as_half=True)
    for key, value in vae.items():
        assert torch.equal(out[f"first_stage_model.{key}"], value.half())
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(out[key], ((1 - M) * states["a"][key] + M * states["b"][key]).half(), rtol=1e-3, atol=1e-4)
    assert json.loads(meta["sd_merge_recipe"])["bake_in_vae"] == "better.vae.safetensors"


def test_discard_weights(ctx):
    out, _ = merged(ctx, interpolation="No interpolation", name="no-text", discard_weights=r"^cond_stage_model\.")
    assert out and not any(k.startswith("cond_stage_model.") for k in out)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"name": "../escape"}, "cannot be a file name"),
        ({"name": "a/b"}, "cannot be a file name"),
        ({"name": "   "}, "empty"),
        ({"name": "a"}, "a.safetensors already exists"),
        ({"name": "x" * 201}, "at most 200"),
        ({"secondary": None}, "needs model B"),
        ({"secondary": "missing"}, "missing"),
        ({"interpolation": "Sigmoid"}, "no interpolation method 'Sigmoid'"),
        ({"checkpoint_format": "pt"}, "checkpoint format"),
        ({"discard_weights": "("}, "not a regular expression"),
        ({"multiplier": float("nan")}, "multiplier"),
    ],
)
def test_refusals_name_the_problem_and_write_nothing(ctx, fields, words):
    before = sorted(p.name for p in ctx.paths.checkpoints.iterdir())
    with pytest.raises((MergeError, LookupError), match=words):
        merger.merge(ctx, MergeRequest(**{"primary": "a", "secondary": "b", "name": "out", **fields}))
    assert sorted(p.name for p in ctx.paths.checkpoints.iterdir()) == before


def test_interrupted_merge_leaves_no_file(ctx):
    job = Job()
    job.interrupt()
    with pytest.raises(merger.MergeStopped):
        merger.merge(ctx, MergeRequest(primary="a", secondary="b", name="stopped"), job=job)
    assert sorted(p.name for p in ctx.paths.checkpoints.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_plan_is_pure_and_refuses_models_of_different_kinds():
    f32 = torch.float32
    a = {"model.x": Info(f32, (4, 4)), "model.ids": Info(torch.int64, (4,))}
    b = {"model.x": Info(f32, (4, 8)), "model.ids": Info(torch.int64, (4,))}
    with pytest.raises(MergeError, match=r"model.x is \[4, 4\] in A but \[4, 8\] in B"):
        merger.plan(find_interpolation("Weighted sum"), a, b)
    steps = merger.plan(find_interpolation("Weighted sum"), a, {**b, "model.x": Info(f32, (4, 4))}, half=True).steps
    assert [(s.key, s.dtype, s.source) for s in steps] == [("model.x", torch.float16, "merge"), ("model.ids", torch.int64, "A")]


def test_streamed_file_is_valid_safetensors(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.int16).reshape(2, 3), "a": torch.randn(3, dtype=torch.bfloat16), "s": torch.tensor(1.5)}
    entries = safetensors_stream.plan((k, v.dtype, tuple(v.shape)) for k, v in tensors.items())
    with open(tmp_path / "x.safetensors", "wb") as f:
        safetensors_stream.write(f, entries, lambda e: tensors[e.key], {"note": "hi"})
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    save_file(tensors, tmp_path / "y.safetensors")
    with safetensors_stream.Reader(tmp_path / "y.safetensors") as reader:
        assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())
    (tmp_path / "z.safetensors").write_bytes((tmp_path / "y.safetensors").read_bytes()[:-3])
    with pytest.raises(safetensors_stream.FormatError, match="does not fit the file"):
        safetensors_stream.Reader(tmp_path / "z.safetensors")
