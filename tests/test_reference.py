"""Our networks against independent implementations with the same weights: diffusers'
UNet2DConditionModel and AutoencoderKL (weights converted from our ldm/sgm layout by diffusers' own
single-file conversion) for SD 1.x, 2.x and SDXL, transformers' CLIPTextModel, and open_clip's
own CLIP for the OpenCLIP text towers of SD 2.x and SDXL."""

from __future__ import annotations

import pytest
import torch

from modules.models.detect import LAYOUTS
from modules.models.sd_model import build_model
from modules.models.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder
from modules.models.unet import UNetModel
from modules.models.vae import AutoencoderKL
from tests.reference_models import diffusers_unet, diffusers_vae
from tests.tiny import randomize_, tiny_family_spec

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4
TEXT_TOLERANCE = 1e-5
BOS, EOS = 49406, 49407

UNET_KWARGS = dict(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    attention_resolutions=(2, 4),  # no attention at full resolution, as in nothing of SD1 but worth covering
    num_res_blocks=2,
    channel_mult=(1, 2, 2),
    num_heads=8,
    context_dim=48,
    transformer_depth=1,
    use_linear_in_transformer=False,
)
VAE_KWARGS = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4, embed_dim=4)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_unet_matches_diffusers(use_linear):
    kwargs = {**UNET_KWARGS, "use_linear_in_transformer": use_linear}
    ours = randomize_(UNetModel(**kwargs), seed=1).eval()
    theirs = diffusers_unet(kwargs, ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981.0, 3.5])
    context = torch.randn(2, 77, kwargs["context_dim"], generator=g)
    with torch.no_grad():
        a = ours(x, t, context)
        b = theirs(x, t, encoder_hidden_states=context).sample
    assert a.shape == x.shape
    assert b.abs().max() > 0.1  # the comparison means something
    assert _max_error(a, b) < TOLERANCE


def test_vae_matches_diffusers():
    ours = randomize_(AutoencoderKL(**VAE_KWARGS), seed=2).eval()
    theirs = diffusers_vae(VAE_KWARGS, ours, UNET_KWARGS)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        mean, logvar = ours.encode(img)
        posterior = theirs.encode(img).latent_dist
        decoded, theirs_decoded = ours.decode(z), theirs.decode(z).sample
    assert mean.shape == (1, 4, 8, 8) and decoded.shape == (1, 3, 32, 32)
    assert _max_error(mean, posterior.mean) < TOLERANCE
    assert _max_error(logvar, posterior.logvar) < TOLERANCE
    assert _max_error(decoded, theirs_decoded) < TOLERANCE


def test_text_encoder_matches_transformers():
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )
    ours = randomize_(CLIPTextEncoder(config), seed=3).eval()
    checkpoint = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    # diffusers strips `cond_stage_model.transformer.`; current transformers keeps no `text_model.` level.
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(checkpoint).items()}
    theirs = CLIPTextModel(config).eval()
    theirs.load_state_dict(converted, strict=True)
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = theirs(input_ids=tokens, output_hidden_states=True)
        assert _max_error(ours(tokens), out.last_hidden_state) < TOLERANCE
        skip2 = theirs.final_layer_norm(out.hidden_states[-2])
        assert _max_error(ours(tokens, clip_skip=2), skip2) < TOLERANCE


# SD 2.x and SDXL UNets at few channels: a fixed head width, linear projections, two ResBlocks a
# level as the real ones, and levels without attention where the real ones have them (SD 2.x's
# last, SDXL's first, the refiner's first and last). SDXL's depths differ per level so that a
# level given another's depth shows. The vector families' contexts have their real widths:
# diffusers' conversion tells SDXL's label_emb from a plain class projection by them alone.
_FIXED_HEAD_WIDTH = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, num_head_channels=8,
                         use_linear_in_transformer=True)
POOLED_WIDTH = 32
FAMILY_UNETS = {
    "SD2": dict(_FIXED_HEAD_WIDTH, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), transformer_depth=1,
                context_dim=32),
    "SDXL": dict(_FIXED_HEAD_WIDTH, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), transformer_depth=(0, 1, 2),
                 context_dim=2048, adm_in_channels=POOLED_WIDTH + 6 * 256),
    "SDXL refiner": dict(_FIXED_HEAD_WIDTH, channel_mult=(1, 2, 2, 2), attention_resolutions=(2, 4),
                         transformer_depth=2, context_dim=1280, adm_in_channels=POOLED_WIDTH + 5 * 256),
}


def _size_conditioning(family: str, kwargs: dict, pooled: torch.Tensor, width: int, height: int):
    """The vector input both ways: ours from SDModel.vector, diffusers' as the pipelines pass it
    (pooled text and the raw numbers, which its UNet embeds itself). The second row of the
    refiner's batch is a negative prompt (the lower aesthetic score)."""
    model = build_model(tiny_family_spec(family, unet=kwargs), device="meta")  # vector() reads only the spec
    negative = [False, family == "SDXL refiner"]
    y = torch.stack([model.vector(p, width, height, negative=n) for p, n in zip(pooled, negative)])
    if family == "SDXL":  # original size, crop's top-left corner, target size
        time_ids = [[height, width, 0, 0, height, width]] * 2
    else:  # original size, crop's top-left corner, aesthetic score
        time_ids = [[height, width, 0, 0, 6.0], [height, width, 0, 0, 2.5]]
    return y, {"text_embeds": pooled, "time_ids": torch.tensor(time_ids, dtype=torch.float32)}


@pytest.mark.parametrize("family", list(FAMILY_UNETS))
def test_family_unet_matches_diffusers(family):
    kwargs = FAMILY_UNETS[family]
    ours = randomize_(UNetModel(**kwargs), seed=5).eval()
    theirs = diffusers_unet(kwargs, ours)
    heads = [kwargs["model_channels"] * m // kwargs["num_head_channels"] for m in kwargs["channel_mult"]]
    assert theirs.config.attention_head_dim == heads  # diffusers' name for the heads per level
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981.0, 3.5])
    context = torch.randn(2, 77, kwargs["context_dim"], generator=g)
    y, added = None, None
    if "adm_in_channels" in kwargs:
        assert theirs.config.addition_embed_type == "text_time"
        # Not square, so that height and width in the wrong order would show.
        y, added = _size_conditioning(family, kwargs, torch.randn(2, POOLED_WIDTH, generator=g), width=832, height=1216)
    with torch.no_grad():
        a = ours(x, t, context, y)
        b = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        if added is not None:
            swapped = added["time_ids"].clone()
            swapped[:, [0, 1]] = swapped[:, [1, 0]]
            c = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs={**added, "time_ids": swapped}).sample
            assert _max_error(a, c) > 100 * TOLERANCE  # the size numbers' order is what is being checked
    assert a.shape == x.shape
    assert b.abs().max() > 0.1
    assert _max_error(a, b) < TOLERANCE


def _clip_rows(pad: int) -> torch.Tensor:
    """Two chunk rows as CLIP tokenizers make them: BOS, token ids, EOS, then `pad` (open_clip's
    tokenizer pads with 0, transformers' CLIP tokenizer and our chunks with EOS). One row is full
    (its EOS at the last position), the other short."""
    g = torch.Generator().manual_seed(0)
    rows = torch.full((2, 77), pad, dtype=torch.long)
    for row, n in enumerate((75, 9)):
        rows[row, 0] = BOS
        rows[row, 1:n + 1] = torch.randint(1, BOS, (n,), generator=g)
        rows[row, n + 1] = EOS
    return rows


OPENCLIP_SIZES = dict(width=64, layers=3, heads=2, embed_dim=48)


@pytest.fixture(scope="module")
def open_clip_model():
    """open_clip's own CLIP (a token vision tower beside the text tower) with random weights, and
    its text tower's state dict: the keys SD 2.x/SDXL checkpoints keep under `…model.`."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    width, layers, heads, embed_dim = (OPENCLIP_SIZES[k] for k in ("width", "layers", "heads", "embed_dim"))
    with torch.random.fork_rng(devices=[]):
        theirs = CLIP(embed_dim, CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=8, image_size=16),
                      CLIPTextCfg(width=width, heads=heads, layers=layers)).eval()
    randomize_(theirs, seed=4)
    with torch.no_grad():  # open_clip initialises it at 0.01, too small to show a misplaced position
        theirs.positional_embedding.copy_(torch.randn(theirs.positional_embedding.shape,
                                                      generator=torch.Generator().manual_seed(5)) * 0.1)
    text_state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("visual.")}
    return theirs, text_state


def _openclip_encoder(text_state: dict, **settings) -> OpenCLIPTextEncoder:
    ours = OpenCLIPTextEncoder(**OPENCLIP_SIZES, **settings).eval()
    assert set(ours.model.state_dict()) == set(text_state)
    ours.model.load_state_dict(text_state, strict=True)
    return ours


def _open_clip_layers(theirs, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block of open_clip's text transformer, run as its encode_text runs them."""
    assert theirs.transformer.batch_first
    x = theirs.token_embedding(tokens) + theirs.positional_embedding
    outputs = []
    for block in theirs.transformer.resblocks:
        x = block(x, attn_mask=theirs.attn_mask)
        outputs.append(x)
    return outputs


def test_openclip_text_encoder_matches_open_clip(open_clip_model):
    theirs, text_state = open_clip_model
    ours = _openclip_encoder(text_state, min_skip=1, final_norm=True)
    tokens, eos_padded = _clip_rows(pad=0), _clip_rows(pad=EOS)
    assert torch.equal(ours.padded(eos_padded), tokens)
    with torch.no_grad():
        layers = _open_clip_layers(theirs, tokens)
        pooled_ref = theirs.encode_text(tokens, normalize=False)
        hidden, pooled = ours(tokens, pooled=True)
        assert pooled_ref.abs().max() > 0.1
        assert _max_error(pooled, pooled_ref) < TEXT_TOLERANCE
        assert _max_error(hidden, theirs.ln_final(layers[-1])) < TEXT_TOLERANCE
        assert _max_error(ours(tokens, clip_skip=2), theirs.ln_final(layers[-2])) < TEXT_TOLERANCE
        # Rows padded with EOS (as our chunks are) read as open_clip's 0-padded ones.
        eos_hidden, eos_pooled = ours(eos_padded, pooled=True)
        assert torch.equal(eos_hidden, hidden) and torch.equal(eos_pooled, pooled)

        # The families' settings: SD 2.x the penultimate layer through the final norm, SDXL's bigG
        # without it, and its pooled vector from the last layer whatever layer conditions.
        sd2 = _openclip_encoder(text_state, **LAYOUTS["SD2"].encoders[0][3])
        assert _max_error(sd2(eos_padded), theirs.ln_final(layers[-2])) < TEXT_TOLERANCE
        sdxl = _openclip_encoder(text_state, **LAYOUTS["SDXL"].encoders[1][3])
        hidden, pooled = sdxl(eos_padded, pooled=True)
        assert _max_error(hidden, layers[-2]) < TEXT_TOLERANCE
        assert _max_error(pooled, pooled_ref) < TEXT_TOLERANCE
        assert _max_error(sdxl(eos_padded, clip_skip=3), layers[-3]) < TEXT_TOLERANCE


def test_openclip_text_encoder_matches_diffusers_conversion(open_clip_model):
    """diffusers' SDXL pipelines condition on its CLIPTextModelWithProjection converted from the
    same keys: hidden_states[-2] and text_embeds must be our SDXL settings' hidden and pooled."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _, text_state = open_clip_model
    prefix = "conditioner.embedders.1.model."
    checkpoint = {prefix + k: v for k, v in text_state.items()}
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=OPENCLIP_SIZES["width"], intermediate_size=4 * OPENCLIP_SIZES["width"],
        num_hidden_layers=OPENCLIP_SIZES["layers"], num_attention_heads=OPENCLIP_SIZES["heads"],
        projection_dim=OPENCLIP_SIZES["embed_dim"], max_position_embeddings=77, hidden_act="gelu",
    )
    theirs = CLIPTextModelWithProjection(config).eval()
    theirs.load_state_dict(sfu.convert_open_clip_checkpoint(theirs, checkpoint, prefix=prefix), strict=True)
    tokens = _clip_rows(pad=0)
    sdxl = _openclip_encoder(text_state, **LAYOUTS["SDXL"].encoders[1][3])
    with torch.no_grad():
        out = theirs(input_ids=tokens, output_hidden_states=True)
        hidden, pooled = sdxl(tokens, pooled=True)
    assert _max_error(hidden, out.hidden_states[-2]) < TEXT_TOLERANCE
    assert _max_error(pooled, out.text_embeds) < TEXT_TOLERANCE


def test_penultimate_clip_text_encoder_matches_transformers():
    """SDXL's CLIP ViT-L: the penultimate layer without the final norm, even at CLIP skip 1."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )
    ours = randomize_(CLIPTextEncoder(config, **LAYOUTS["SDXL"].encoders[0][3]), seed=6).eval()
    checkpoint = {"conditioner.embedders.0." + k: v for k, v in ours.state_dict().items()}
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(checkpoint).items()}
    theirs = CLIPTextModel(config).eval()
    theirs.load_state_dict(converted, strict=True)
    tokens = _clip_rows(pad=EOS)
    with torch.no_grad():
        out = theirs(input_ids=tokens, output_hidden_states=True)
        assert out.hidden_states[-2].abs().max() > 0.1
        for clip_skip in (1, 2):
            assert _max_error(ours(tokens, clip_skip=clip_skip), out.hidden_states[-2]) < TEXT_TOLERANCE
        assert _max_error(ours(tokens, clip_skip=3), out.hidden_states[-3]) < TEXT_TOLERANCE
