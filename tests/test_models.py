import pytest
import torch

from modules.models.detect import sd15_spec
from modules.models.sd_model import SDModel, build_model, scaled_linear_alphas_cumprod
from modules.models.unet import timestep_embedding
from tests.tiny import tiny_sd_model, tiny_spec

# Stable Diffusion 1.5 as released: state-dict entries and parameter counts per network
# (the CLIP count excludes `embeddings.position_ids`, a buffer many files also carry).
SD15_COUNTS = {
    "model.diffusion_model.": (686, 859_520_964),
    "first_stage_model.": (248, 83_653_863),
    "cond_stage_model.": (196, 123_060_480),
}
SD15_SHAPES = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.bias": (1280,),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.norm.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}


@pytest.fixture(scope="module")
def sd15_meta():
    return build_model(sd15_spec(), device="meta")


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_model(seed=0)


def test_sd15_key_counts_and_parameters(sd15_meta):
    state = sd15_meta.state_dict()
    for prefix, (n_keys, n_params) in SD15_COUNTS.items():
        keys = [k for k in state if k.startswith(prefix)]
        assert len(keys) == n_keys, prefix
        assert sum(state[k].numel() for k in keys) == n_params, prefix
    assert len(state) == sum(n for n, _ in SD15_COUNTS.values())


def test_sd15_shapes(sd15_meta):
    state = sd15_meta.state_dict()
    for key, shape in SD15_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_schedule_is_a_buffer_not_a_checkpoint_key(tiny):
    assert "alphas_cumprod" not in tiny.state_dict()
    ac = tiny.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert ac[0].item() == pytest.approx(1 - 0.00085)
    sigmas = ((1 - ac) / ac).sqrt()  # SD1's well-known sigma range
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert torch.equal(scaled_linear_alphas_cumprod(), ac)


def test_tiny_known_keys(tiny):
    state = tiny.state_dict()
    for key in (
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_out.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # ResBlock, attention, Upsample
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        assert key in state, key


def test_tiny_shapes(tiny):
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        eps = tiny.apply_model(x, torch.tensor([999.0, 0.5]), context)
        img = tiny.decode_first_stage(x)
        latent = tiny.encode_first_stage(img)
        cond, pooled = tiny.encode_text(torch.randint(0, 49408, (3, 77)))
    assert eps.shape == x.shape and eps.abs().max() > 0.01
    assert img.shape == (2, 3, 64, 64)
    assert latent.shape == (2, 4, 8, 8)
    assert cond.shape == (3, 77, 32) and pooled is None  # SD 1.x makes no pooled vector


def test_timesteps_broadcast_from_a_scalar(tiny):
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        a = tiny.apply_model(x, torch.tensor(500.0), context)
        b = tiny.apply_model(x, torch.tensor([500.0, 500.0]), context)
    assert torch.equal(a, b)


def test_timestep_embedding_halves():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(10.0)).item())  # frequency 1 first


def test_same_seed_same_model_and_output():
    a, b, c = tiny_sd_model(seed=5), tiny_sd_model(seed=5), tiny_sd_model(seed=6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.unet.out[2].weight, c.unet.out[2].weight)
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 32)
    t = torch.tensor([321.0])
    with torch.no_grad():
        assert torch.equal(a.apply_model(x, t, context), a.apply_model(x, t, context))
        assert torch.equal(a.apply_model(x, t, context), b.apply_model(x, t, context))


def test_tiny_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    tiny_sd_model(seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_state_dict_round_trip_strict(tiny):
    fresh = SDModel(tiny_spec())
    fresh.load_state_dict(tiny.state_dict(), strict=True)
    tokens = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        assert torch.equal(fresh.encode_text(tokens)[0], tiny.encode_text(tokens)[0])


def test_stored_position_ids_are_tolerated(tiny):
    state = dict(tiny.state_dict())
    # Older files carry this buffer, sometimes as floats.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    fresh = SDModel(tiny_spec())
    fresh.load_state_dict(state, strict=True)
    ids = fresh.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids[0], torch.arange(77))


def test_clip_skip_changes_output(tiny):
    tokens = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last, skip2 = tiny.encode_text(tokens, 1)[0], tiny.encode_text(tokens, 2)[0]
    assert last.shape == skip2.shape
    assert (last - skip2).abs().max() > 1e-2
    with pytest.raises(ValueError, match="clip_skip"):
        tiny.encode_text(tokens, 3)  # the tiny encoder has 2 layers


def test_encode_first_stage_sampling(tiny):
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = tiny.encode_first_stage(img)
        s1 = tiny.encode_first_stage(img, torch.Generator().manual_seed(7))
        s2 = tiny.encode_first_stage(img, torch.Generator().manual_seed(7))
        raw_mean, _ = tiny.first_stage_model.encode(img)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, mean)
    assert torch.allclose(mean, raw_mean * tiny.scale_factor)


def test_decode_undoes_scale_factor(tiny):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        # z * s / s differs from z by float rounding only.
        assert torch.allclose(tiny.decode_first_stage(z * tiny.scale_factor), tiny.first_stage_model.decode(z), atol=1e-5)
        assert not torch.allclose(tiny.decode_first_stage(z), tiny.first_stage_model.decode(z), atol=1e-2)


def test_inpainting_unet_takes_c_concat():
    model = tiny_sd_model(seed=0, family="SD1 inpainting", unet={"in_channels": 9})
    assert model.unet.input_blocks[0][0].weight.shape[1] == 9
    x = torch.randn(1, 4, 8, 8)
    c_concat = torch.randn(1, 5, 8, 8)
    with torch.no_grad():
        out = model.apply_model(x, torch.tensor([10.0]), torch.randn(1, 77, 32), c_concat=c_concat)
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_half_precision_unet_matches_float32_and_returns_the_inputs_dtype(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10.0, 700.0])
    half = tiny_sd_model(seed=0)
    half.model.to(dtype)
    with torch.no_grad():
        out = half.apply_model(x, t, context)
        ref = tiny_sd_model(seed=0).apply_model(x, t, context)
    assert out.dtype == torch.float32 and next(half.model.parameters()).dtype == dtype
    assert not torch.equal(out, ref)  # it really ran in half precision
    assert ((out - ref).norm() / ref.norm()).item() < tolerance


def test_sizes_must_agree():
    from modules.models.unet import UNetModel

    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1, 1), context_dim=32)


@pytest.mark.parametrize("side", [7, 9, 13])
def test_latent_sides_that_do_not_halve_evenly_keep_their_size(side):
    # SD 1.5 halves the latent three times: a 520 px picture's 65 cells come back as 66 from the
    # up path unless each upsampled map is sized to its skip connection.
    unet = tiny_sd_model(seed=0, unet={"channel_mult": (1, 2, 2), "attention_resolutions": (2,)}).unet
    x = torch.randn(1, 4, side, side + 2)
    with torch.no_grad():
        out = unet(x, torch.tensor([500.0]), torch.randn(1, 77, 32))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_group_norms_gather_float32_statistics(dtype):
    """The UNet and VAE use plain nn.GroupNorm in every precision, on the grounds that PyTorch
    gathers a half-precision input's statistics in float32 itself: its output must match a norm
    computed wholly in float32 to within the half type's last bit, over a large feature map whose
    mean is far from 0 (where statistics gathered in half precision would be far off)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 320, 64, 64, generator=g) * 30 + 200
    norm = torch.nn.GroupNorm(32, 320, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(320, generator=g))
        norm.bias.copy_(torch.randn(320, generator=g))
        x = x.to(dtype)
        half = norm(x)
        reference = torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-5).to(dtype)
    ulp = torch.finfo(dtype).eps * reference.float().abs().clamp(min=1)
    assert bool(((half.float() - reference.float()).abs() <= ulp).all())
