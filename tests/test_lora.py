"""kohya-ss LoRA: names mapped onto our ldm-layout modules, the weight change it makes, the model
bit-identical afterwards, and the errors a person can act on."""

import functools
import math

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from torch import nn

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.models.loader import addnet_hash
from modules.models.unet import UNetModel
from modules.networks import lora
from modules.prompting.extra_networks import NetworkCall
from modules.service.jobs import Job
from tests.tiny import tiny_family_model, tiny_sd_model

# kohya name -> our module path, written out by hand for the tiny model (two levels, one ResBlock
# per level, attention on the second): an independent check of the derived table.
TINY_NAMES = {
    "lora_unet_conv_in": "model.diffusion_model.input_blocks.0.0",
    "lora_unet_time_embedding_linear_2": "model.diffusion_model.time_embed.2",
    "lora_unet_down_blocks_0_resnets_0_conv1": "model.diffusion_model.input_blocks.1.0.in_layers.2",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "model.diffusion_model.input_blocks.2.0.op",
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": "model.diffusion_model.input_blocks.3.0.emb_layers.1",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "model.diffusion_model.input_blocks.3.0.skip_connection",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_mid_block_resnets_1_conv2": "model.diffusion_model.middle_block.2.out_layers.3",
    "lora_unet_up_blocks_0_attentions_1_proj_out": "model.diffusion_model.output_blocks.1.1.proj_out",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj":
        "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0":
        "model.diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.1.2.conv",
    "lora_unet_up_blocks_1_resnets_1_conv2": "model.diffusion_model.output_blocks.3.0.out_layers.3",
    "lora_unet_conv_out": "model.diffusion_model.out.2",
    "lora_unet_input_blocks_3_1_proj_in": "model.diffusion_model.input_blocks.3.1.proj_in",  # ldm spelling
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1",
}
TEXT_LAYERS = [n for n in TINY_NAMES if n.startswith("lora_te_")]
CONV_3X3 = "lora_unet_mid_block_resnets_1_conv2"

# The same for tiny SDXL (two levels, one ResBlock each, attention on the second only, two
# transformer blocks deep; both text encoders 32 wide), SD 2.x and the SDXL refiner. A value is a
# module path (its weight), or (parameter path, rows) where a layer changes part of a parameter or
# a parameter that is not a module's weight.
UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model.encoder.layers."
BIG_G = "conditioner.embedders.1.model.transformer.resblocks."
XL_NAMES = {
    "lora_unet_conv_in": UNET + "input_blocks.0.0",
    "lora_unet_time_embedding_linear_1": UNET + "time_embed.0",
    "lora_unet_add_embedding_linear_1": UNET + "label_emb.0.0",
    "lora_unet_label_emb_0_2": UNET + "label_emb.0.2",  # ldm spelling of add_embedding_linear_2
    "lora_unet_down_blocks_0_resnets_0_conv2": UNET + "input_blocks.1.0.out_layers.3",
    "lora_unet_down_blocks_0_downsamplers_0_conv": UNET + "input_blocks.2.0.op",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": UNET + "input_blocks.3.0.skip_connection",
    "lora_unet_down_blocks_1_attentions_0_proj_in": UNET + "input_blocks.3.1.proj_in",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k":
        UNET + "input_blocks.3.1.transformer_blocks.1.attn2.to_k",
    "lora_unet_mid_block_resnets_0_time_emb_proj": UNET + "middle_block.0.emb_layers.1",
    "lora_unet_mid_block_attentions_0_transformer_blocks_1_ff_net_0_proj":
        UNET + "middle_block.1.transformer_blocks.1.ff.net.0.proj",
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0":  # ldm spelling, as kohya's SDXL trainer
        UNET + "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_1_attn1_to_v":
        UNET + "output_blocks.1.1.transformer_blocks.1.attn1.to_v",
    "lora_unet_output_blocks_0_1_proj_out": UNET + "output_blocks.0.1.proj_out",
    "lora_unet_up_blocks_0_upsamplers_0_conv": UNET + "output_blocks.1.2.conv",
    "lora_unet_up_blocks_1_resnets_0_conv1": UNET + "output_blocks.2.0.in_layers.2",
    "lora_unet_up_blocks_1_resnets_1_conv_shortcut": UNET + "output_blocks.3.0.skip_connection",
    "lora_unet_conv_out": UNET + "out.2",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": CLIP_L + "0.self_attn.q_proj",
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": CLIP_L + "1.mlp.fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (BIG_G + "0.attn.in_proj_weight", slice(0, 32)),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (BIG_G + "0.attn.in_proj_weight", slice(32, 64)),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": (BIG_G + "1.attn.in_proj_weight", slice(64, 96)),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": BIG_G + "0.attn.out_proj",
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": BIG_G + "1.mlp.c_fc",
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": BIG_G + "0.mlp.c_proj",
    "lora_te2_model_transformer_resblocks_1_mlp_c_proj": BIG_G + "1.mlp.c_proj",  # open_clip spelling
    "lora_te2_model_transformer_resblocks_1_attn_in_proj": (BIG_G + "1.attn.in_proj_weight", None),
}
VIT_H = "cond_stage_model.model.transformer.resblocks."
SD2_NAMES = {
    "lora_unet_down_blocks_1_attentions_0_proj_in": UNET + "input_blocks.3.1.proj_in",  # a Linear in SD 2.x
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_up_blocks_0_upsamplers_0_conv": UNET + "output_blocks.1.2.conv",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (VIT_H + "0.attn.in_proj_weight", slice(0, 32)),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (VIT_H + "0.attn.in_proj_weight", slice(32, 64)),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": VIT_H + "1.attn.out_proj",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": VIT_H + "0.mlp.c_fc",
    "lora_te_text_model_encoder_layers_0_mlp_fc2": VIT_H + "0.mlp.c_proj",
}
REFINER_G = "conditioner.embedders.0.model.transformer.resblocks."
REFINER_NAMES = {  # its lone bigG is lora_te_, as kohya names a single text encoder
    "lora_unet_add_embedding_linear_1": UNET + "label_emb.0.0",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v":
        UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_v",
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (REFINER_G + "1.attn.in_proj_weight", slice(0, 32)),
    "lora_te_text_model_encoder_layers_0_mlp_fc2": REFINER_G + "0.mlp.c_proj",
}
FAMILY_NAMES = {"SDXL": XL_NAMES, "SD2": SD2_NAMES, "SDXL refiner": REFINER_NAMES}


@pytest.fixture(scope="module")
def model():
    return tiny_sd_model(seed=0)


def place(model, where) -> tuple[nn.Parameter, slice | None]:
    """A table value (see XL_NAMES) -> the parameter and the rows it names."""
    if isinstance(where, str):
        return model.get_submodule(where).weight, None
    path, rows = where
    return model.get_parameter(path), rows


def kohya_tensors(model, names, rank=4, seed=0, alpha=2.0, table=TINY_NAMES) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA for `names` of a tiny model: down [r, in(, k, k)], up [out, r(, 1, 1)],
    alpha; a conv layer's `down` has the layer's own kernel (3x3 for 3x3 convs, as LoCon makes)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        weight, rows = place(model, table[name])
        shape = weight.shape if rows is None else weight[rows].shape
        if len(shape) == 4:
            down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(math.prod(shape[1:]))
            up = torch.randn(shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
            up = torch.randn(shape[0], rank, generator=g)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def as_file(tensors, name="test") -> lora.LoraFile:
    return lora.LoraFile(name, None, lora.read_layers(tensors, name), {})


def call(name="test", te=1.0, unet=1.0):
    return NetworkCall("lora", name, te, unet, 0)


def snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, (value, pointer) in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].data_ptr() == pointer, key  # the very same tensor, not a copy


def outputs(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 49406, (1, 77), generator=g)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return model.encode_text(tokens)[0], model.apply_model(x, torch.tensor([500.0]), context)


# ---- names ----


def test_hand_written_names_find_their_modules(model):
    targets = lora.layer_targets(model)
    for name, path in TINY_NAMES.items():
        assert targets[name].weight is model.get_submodule(path).weight and targets[name].rows is None, name


# UNets of each family's layout, few channels: SDXL's first level has no attention and its others
# 2 and 10 transformer blocks (the middle block too), the refiner's last level has none. A
# `num_classes` of "sequential" tells diffusers' conversion that label_emb is there (add_embedding
# for the SDXL context widths 2048 and 1280); our UNet takes no such argument.
DIFFUSERS_LAYOUTS = {
    "SD1": dict(channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_heads=4, context_dim=16,
                transformer_depth=1, use_linear_in_transformer=False),
    "SD2": dict(channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_head_channels=8, context_dim=1024,
                transformer_depth=1, use_linear_in_transformer=True),
    "SDXL": dict(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=8, context_dim=2048,
                 transformer_depth=(0, 2, 10), use_linear_in_transformer=True, adm_in_channels=2816),
    "SDXL refiner": dict(channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_head_channels=8, context_dim=1280,
                         transformer_depth=4, use_linear_in_transformer=True, adm_in_channels=2560),
}


@pytest.mark.parametrize("family", DIFFUSERS_LAYOUTS)
def test_unet_names_follow_diffusers_own_conversion(family):
    """diffusers' single-file conversion builds its UNet from our weights; every module our
    table pairs with a diffusers path must hold the same weight there, and the table must cover
    every Linear and Conv2d that diffusers' UNet has."""
    pytest.importorskip("diffusers")
    from tests.reference_models import diffusers_unet

    kwargs = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, **DIFFUSERS_LAYOUTS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        ours = UNetModel(**kwargs)  # default initialisation: random, every weight its own
    label = {"num_classes": "sequential"} if "adm_in_channels" in kwargs else {}
    theirs = diffusers_unet(kwargs | label, ours)
    paths = lora.unet_diffusers_paths(ours)
    their_modules = dict(theirs.named_modules())
    for our_path, their_path in paths.items():
        assert torch.equal(ours.get_submodule(our_path).weight, their_modules[their_path].weight), (our_path, their_path)
    adaptable = {n for n, m in their_modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(paths.values()) == adaptable
    assert set(paths) == {n for n, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if label:
        assert paths["label_emb.0.0"] == "add_embedding.linear_1" and paths["label_emb.0.2"] == "add_embedding.linear_2"


# ---- the weight change ----


def test_weights_become_w_plus_scaled_up_down(model):
    names = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", CONV_3X3,
             "lora_unet_up_blocks_0_attentions_1_proj_out"]
    tensors = kohya_tensors(model, names, rank=4, alpha=2.0)
    originals = {n: model.get_submodule(TINY_NAMES[n]).weight.clone() for n in names}
    restore = lora.apply(model, [(as_file(tensors), call(unet=0.5))])
    try:
        for name in names:
            up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(originals[name].shape)
            expected = originals[name] + 0.5 * 2.0 / 4 * delta
            assert torch.allclose(model.get_submodule(TINY_NAMES[name]).weight, expected, atol=1e-6), name
    finally:
        restore()


def test_without_alpha_the_scale_is_one(model):
    name = "lora_unet_conv_out"
    tensors = {k: v for k, v in kohya_tensors(model, [name], rank=2).items() if not k.endswith("alpha")}
    layer = lora.read_layers(tensors, "x")[name]
    assert layer.alpha is None
    expected = (tensors[f"{name}.lora_up.weight"].flatten(1) @ tensors[f"{name}.lora_down.weight"].flatten(1))
    assert torch.equal(layer.delta(model.get_submodule(TINY_NAMES[name]).weight.shape).flatten(1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_applied_then_removed_leaves_every_tensor_bit_identical(dtype):
    model = tiny_sd_model(seed=0).to(dtype)
    before = snapshot(model)
    two = [(as_file(kohya_tensors(model, TINY_NAMES, seed=1), "a"), call("a", 0.7, 1.3)),
           (as_file(kohya_tensors(model, list(TINY_NAMES)[:5], rank=2, seed=2), "b"), call("b", -1.0, 0.4))]
    restore = lora.apply(model, two)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k][0])]
    assert len(changed) == len(TINY_NAMES)
    assert all(v.dtype == dtype for v in model.state_dict().values())
    restore()
    assert_unchanged(model, before)


def test_lora_changes_the_unet_and_the_text_encoder_separately(model):
    text, unet = outputs(model)
    tensors = kohya_tensors(model, TINY_NAMES, seed=3)
    for te, unet_weight, text_changes, unet_changes in [(1, 0, True, False), (0, 1, False, True), (0, 0, False, False)]:
        restore = lora.apply(model, [(as_file(tensors), call(te=te, unet=unet_weight))])
        try:
            text2, unet2 = outputs(model)
        finally:
            restore()
        assert (not torch.allclose(text, text2, atol=1e-4)) == text_changes
        assert (not torch.allclose(unet, unet2, atol=1e-4)) == unet_changes
    assert [torch.equal(a, b) for a, b in zip(outputs(model), (text, unet))] == [True, True]


def test_a_3x3_conv_lora_alone_changes_the_unet(model):
    _, unet = outputs(model)
    tensors = kohya_tensors(model, [CONV_3X3], seed=4)
    assert tensors[f"{CONV_3X3}.lora_down.weight"].shape[2:] == (3, 3)
    restore = lora.apply(model, [(as_file(tensors), call())])
    try:
        _, changed = outputs(model)
    finally:
        restore()
    assert (changed - unet).abs().max() > 1e-3


# ---- errors ----


def test_files_of_other_kinds_are_named(model):
    with pytest.raises(lora.LoraError, match="LyCORIS LoHa"):
        lora.read_layers({"lora_unet_x.hada_w1_a": torch.zeros(1)}, "loha.safetensors")
    with pytest.raises(lora.LoraError, match="diffusers/PEFT"):
        lora.read_layers({"unet.down_blocks.0.to_q.lora_A.weight": torch.zeros(1)}, "peft.safetensors")
    with pytest.raises(lora.LoraError, match="lacks its lora_up"):
        lora.read_layers({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, "half.safetensors")


def test_a_lora_for_another_model_changes_nothing(model):
    before = snapshot(model)
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)}
    with pytest.raises(lora.LoraError, match="matches no layer of this model"):
        lora.apply(model, [(as_file(sdxl, "xl"), call("xl"))])
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    wide = {**kohya_tensors(model, [CONV_3X3]), f"{name}.lora_down.weight": torch.zeros(4, 640),
            f"{name}.lora_up.weight": torch.zeros(640, 4)}
    with pytest.raises(lora.LoraError, match="does not fit this model.*attn1_to_q gives \\[640, 640\\].*\\[64, 64\\]"):
        lora.apply(model, [(as_file(wide, "sd2"), call("sd2"))])
    assert_unchanged(model, before)


def test_unknown_name_is_named_with_its_position_and_the_choices(tmp_path, model):
    save_file(kohya_tensors(model, [CONV_3X3]), tmp_path / "detail.safetensors")
    (tmp_path / "sub").mkdir()
    save_file(kohya_tensors(model, [CONV_3X3]), tmp_path / "sub" / "style.safetensors")
    library = lora.LoraLibrary(tmp_path)
    assert [lo.name for lo, _ in library.resolve("<lora:detail:0.5> <lora:sub/style>")] == ["detail", "sub/style"]
    with pytest.raises(lora.LoraError) as info:
        library.resolve("ugly <lora:detial:1>")
    message = str(info.value)
    assert message.startswith("prompt: ") and "'detial'" in message and "character 6" in message
    assert "available: detail, style" in message


def test_hash_is_kohyas_as_a1111_shows_it(tmp_path, model):
    tensors = kohya_tensors(model, [CONV_3X3])
    save_file(tensors, tmp_path / "plain.safetensors")
    save_file(tensors, tmp_path / "tagged.safetensors", metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    library = lora.LoraLibrary(tmp_path)
    resolved = library.resolve("<lora:plain:1> <lora:tagged:0.5> <lora:plain:0.2>")
    assert library.infotext_value(resolved) == f"plain: {addnet_hash(tmp_path / 'plain.safetensors')[:12]}, tagged: 0123456789ab"
    # kohya's hash leaves the header out: new metadata, same hash
    assert addnet_hash(tmp_path / "plain.safetensors") == addnet_hash(tmp_path / "tagged.safetensors")


# ---- SD 2.x and SDXL ----


@functools.cache
def family_model(family):
    return tiny_family_model(family, seed=0)


def text_output(model):
    """Context and pooled vector in one: SD 2.x and SDXL read the penultimate layer, so the tiny
    towers' last layer shows in the pooled vector alone (SDXL's bigG and the refiner's)."""
    context, pooled, _ = family_outputs(model)
    return torch.cat([context.flatten()] + ([pooled.flatten()] if pooled is not None else []))


def family_outputs(model):
    """The text encoders' context and pooled vector, and the UNet's output on that context with
    the vector input where the family has one."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 49406, (1, 77), generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        context, pooled = model.encode_text(tokens)
        y = model.vector(pooled[0], 64, 64)[None] if pooled is not None else None
        return context, pooled, model.apply_model(x, torch.tensor([500.0]), context, y=y)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_names_find_their_weights(family):
    model = family_model(family)
    targets = lora.layer_targets(model)
    for name, where in FAMILY_NAMES[family].items():
        weight, rows = place(model, where)
        assert targets[name].weight is weight and targets[name].rows == rows, name
    prefixes = {n.split("_text_model_")[0] for n in targets if "_text_model_" in n}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "SDXL" else {"lora_te"})


@pytest.mark.parametrize("family, name", [
    ("SDXL", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
    ("SDXL", "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"),
    ("SD2", "lora_te_text_model_encoder_layers_0_self_attn_k_proj"),
    ("SDXL refiner", "lora_te_text_model_encoder_layers_1_self_attn_q_proj"),
])
def test_a_q_k_or_v_lora_changes_only_its_rows_of_in_proj(family, name):
    """kohya's q/k/v of an OpenCLIP tower are row blocks of its fused in_proj_weight: that block
    becomes W + weight * alpha / r * (up @ down), exactly, and nothing else in the model changes."""
    model = family_model(family)
    table = FAMILY_NAMES[family]
    weight, rows = place(model, table[name])
    before = snapshot(model)
    text_before = text_output(model)
    tensors = kohya_tensors(model, [name], rank=4, alpha=2.0, table=table)
    original = weight.detach().clone()
    restore = lora.apply(model, [(as_file(tensors), call(te=0.5))])
    try:
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        assert torch.equal(weight[rows], original[rows] + 0.5 * (up @ down * (2.0 / 4)))
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(weight[others], original[others])  # the other two of q, k, v
        after = model.state_dict()
        assert [k for k in after if after[k].data_ptr() != before[k][1]] == [table[name][0]]
        assert not torch.allclose(text_output(model), text_before, atol=1e-4)
    finally:
        restore()
    assert_unchanged(model, before)
    assert torch.equal(text_output(model), text_before)


# SDXL layers by diffusers' name and our path; kohya's SD 1.x/2.x trainers write the first, its
# SDXL trainer the path itself (lora_unet_input_blocks_3_1_...).
SAME_LAYERS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": "input_blocks.3.1.transformer_blocks.1.attn2.to_k",
    "lora_unet_add_embedding_linear_1": "label_emb.0.0",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "lora_unet_mid_block_resnets_1_conv1": "middle_block.2.in_layers.2",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_1_ff_net_2": "output_blocks.1.1.transformer_blocks.1.ff.net.2",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.1.2.conv",
    "lora_unet_up_blocks_1_resnets_1_conv_shortcut": "output_blocks.3.0.skip_connection",
}


def test_ldm_and_diffusers_unet_names_make_the_same_change():
    model = family_model("SDXL")
    before = snapshot(model)
    ldm_name = {name: "lora_unet_" + path.replace(".", "_") for name, path in SAME_LAYERS.items()}
    table = {ldm_name[name]: UNET + path for name, path in SAME_LAYERS.items()}
    ldm = kohya_tensors(model, table, seed=7, table=table)
    diffusers_name = {v: k for k, v in ldm_name.items()}
    diffusers = {}
    for key, tensor in ldm.items():
        layer, _, part = key.partition(".")
        diffusers[f"{diffusers_name[layer]}.{part}"] = tensor
    states, outs = [], []
    for tensors in (ldm, diffusers):
        restore = lora.apply(model, [(as_file(tensors), call())])
        try:
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            outs.append(family_outputs(model)[2])
        finally:
            restore()
    changed = {k for k, v in states[0].items() if not torch.equal(v, before[k][0])}
    assert changed == {path + ".weight" for path in table.values()}
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], family_outputs(model)[2], atol=1e-4)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_gets_its_tensors_back_bit_identical(family, dtype):
    model = tiny_family_model(family, seed=0).to(dtype)
    table = FAMILY_NAMES[family]
    before = snapshot(model)
    two = [(as_file(kohya_tensors(model, table, seed=1, table=table), "a"), call("a", 0.7, 1.3)),
           (as_file(kohya_tensors(model, list(table)[-4:], rank=2, seed=2, table=table), "b"), call("b", -1.0, 0.4))]
    restore = lora.apply(model, two)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {names[id(place(model, where)[0])] for where in table.values()}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k][0])}
    assert changed == expected
    assert all(v.dtype == dtype for v in model.state_dict().values())
    restore()
    assert_unchanged(model, before)


def test_sdxl_text_and_unet_multipliers_split_as_the_names_say():
    model = family_model("SDXL")
    tensors = kohya_tensors(model, XL_NAMES, seed=3, table=XL_NAMES)
    before = snapshot(model)
    for te, unet in [(1, 0), (0, 1)]:
        restore = lora.apply(model, [(as_file(tensors), call(te=te, unet=unet))])
        try:
            changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k][0])}
        finally:
            restore()
        assert changed and all(k.startswith("conditioner.") == bool(te) for k in changed), (te, changed)
        if te:
            assert {k.split(".")[2] for k in changed} == {"0", "1"}  # both encoders
    assert_unchanged(model, before)


def test_a_lora_of_another_family_gets_the_mismatch_message():
    sd1 = tiny_sd_model(seed=0)
    xl = family_model("SDXL")
    before = snapshot(xl)
    # SD 1.x names: its cross-attention keys take the 32-wide CLIP context, SDXL's the 64-wide one
    with pytest.raises(lora.LoraError, match=r"does not fit this model \(SDXL\): layer .*attn2_to_k gives \[64, 32\]"):
        lora.apply(xl, [(as_file(kohya_tensors(sd1, TINY_NAMES)), call())])
    with pytest.raises(lora.LoraError, match=r"matches no layer of this model \(SDXL\); its layers are named like lora_te_"):
        lora.apply(xl, [(as_file(kohya_tensors(sd1, TEXT_LAYERS)), call())])
    assert_unchanged(xl, before)
    # SDXL base text layers are lora_te1_/lora_te2_; the refiner's lone bigG is lora_te_
    refiner = family_model("SDXL refiner")
    te2 = [n for n in XL_NAMES if n.startswith("lora_te2_")]
    with pytest.raises(lora.LoraError, match=r"matches no layer of this model \(SDXL refiner\)"):
        lora.apply(refiner, [(as_file(kohya_tensors(xl, te2, table=XL_NAMES)), call())])


# ---- generation and API ----


def test_generation_applies_the_lora_for_that_job_only(ctx):
    sd_model = ctx.models.get()
    save_file(kohya_tensors(sd_model, TINY_NAMES, seed=5), ctx.paths.lora / "shiny.safetensors")
    before = snapshot(sd_model)
    base = GenerationRequest(prompt="a red circle", steps=3, width=64, height=64, seed=11)
    plain = pipeline.generate(ctx, base, save=False)
    with_lora = pipeline.generate(ctx, base.replace(prompt="a red circle <lora:shiny:1>"), save=False)
    assert_unchanged(sd_model, before)
    again = pipeline.generate(ctx, base, save=False)
    assert with_lora.images[0].tobytes() != plain.images[0].tobytes()
    assert again.images[0].tobytes() == plain.images[0].tobytes()
    shorthash = addnet_hash(ctx.paths.lora / "shiny.safetensors")[:12]
    assert with_lora.infotexts[0].startswith("a red circle <lora:shiny:1>\nSteps: 3")
    assert with_lora.infotexts[0].endswith(f'Lora hashes: "shiny: {shorthash}"')


def test_unknown_lora_stops_the_job_before_sampling(ctx):
    job = Job()
    with pytest.raises(RequestError, match="no LoRA named 'missing'.*available: none"):
        pipeline.generate(ctx, GenerationRequest(prompt="x <lora:missing:1>", steps=2, width=64, height=64), job=job)
    assert job.step == 0 and job.total_steps == 0


def test_a_negative_prompts_tags_are_text_as_in_a1111(ctx):
    request = GenerationRequest(prompt="a cat", negative_prompt="<lora:nothere:bad>", steps=2, width=64, height=64)
    result = pipeline.generate(ctx, request, save=False)
    assert "Negative prompt: <lora:nothere:bad>\n" in result.infotexts[0] and "Lora hashes" not in result.infotexts[0]


@pytest.mark.parametrize("prompt, words", [
    ("a <lora:nope:1>", ["no LoRA named 'nope'", "character 3"]),
    ("a <lora:nope:notanumber>", ["'notanumber' is not a number", "character 14"]),
    ("(cat:1.2.3) <lora:x>", ["'1.2.3' is not a plain number", "character 6"]),
    ("<hypernet:x:1>", ["unknown extra network <hypernet:...>"]),
])
def test_api_answers_prompt_errors_with_422(ctx, prompt, words):
    app = FastAPI()
    routes.install(app, ctx)
    response = TestClient(app).post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64})
    assert response.status_code == 422
    assert all(w in response.json()["detail"] for w in words), response.text
    assert "Traceback" not in response.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", ["none", "medvram", "lowvram"])
def test_on_the_gpu_every_offload_mode_gets_its_weights_back(data_dir, offload):
    """Half precision, with parts of the model moving between devices during the job: the LoRA
    and an embedding still work, and the weights afterwards equal those before."""
    from modules.app.config import Flags
    from modules.context import AppContext

    ctx = AppContext.create(Flags(data_dir=data_dir, device="cuda", medvram=offload == "medvram", lowvram=offload == "lowvram"))
    sd_model = ctx.models.get()
    save_file(kohya_tensors(sd_model, TINY_NAMES, seed=6), ctx.paths.lora / "shiny.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, ctx.paths.embeddings / "kitty.pt")
    before = {k: v.clone() for k, v in sd_model.state_dict().items()}
    base = GenerationRequest(prompt="a kitty", steps=2, width=64, height=64, seed=1, noise_source="GPU")
    plain = pipeline.generate(ctx, base, save=False)
    with_lora = pipeline.generate(ctx, base.replace(prompt="a kitty <lora:shiny:1>"), save=False)
    after = sd_model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].device == v.device for k, v in before.items())
    assert with_lora.images[0].tobytes() != plain.images[0].tobytes()
    assert "TI hashes" in with_lora.infotexts[0] and "Lora hashes" in with_lora.infotexts[0]


def test_api_lists_loras(ctx):
    (ctx.paths.lora / "sub").mkdir()
    save_file(kohya_tensors(ctx.models.get(), [CONV_3X3]), ctx.paths.lora / "sub" / "detail.safetensors")
    app = FastAPI()
    routes.install(app, ctx)
    assert TestClient(app).get("/sdapi/v1/loras").json() == [
        {"name": "detail", "alias": "detail", "path": str(ctx.paths.lora / "sub" / "detail.safetensors"), "metadata": {}}]
