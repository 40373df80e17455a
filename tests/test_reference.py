"""Our networks against independent implementations with the same weights: diffusers'
UNet2DConditionModel and AutoencoderKL (weights converted from our ldm layout by diffusers' own
single-file conversion) and transformers' CLIPTextModel."""

from __future__ import annotations

import pytest
import torch

from modules.models.text_encoders import CLIPTextEncoder
from modules.models.unet import UNetModel
from modules.models.vae import AutoencoderKL
from tests.reference_models import diffusers_unet, diffusers_vae
from tests.tiny import randomize_

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4

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
