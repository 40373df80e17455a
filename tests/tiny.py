"""Few-channel Stable Diffusion models for tests: the same classes and key layouts as the real
families, small enough that a 64x64 px generation step takes milliseconds on one CPU thread.

    spec = tiny_spec()                                   # ModelSpec, family "SD1"
    spec = tiny_spec(prediction="v", unet={"in_channels": 9})   # dict fields are merged
    model = tiny_sd_model(seed=0)                        # eval mode, requires_grad False
    spec = tiny_family_spec("SDXL", inpainting=True)     # "SD2", "SDXL", "SDXL refiner" too
    model = tiny_family_model("SDXL", seed=0)

The VAE downsamples by 8 as SD's does (latent 8x8 for 64x64 px); the UNet has two levels, so
latent sides must be even. Context width is 32 (the CLIP hidden size); the vocabulary is CLIP's
real one so the real tokenizer works.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from modules.models.detect import LAYOUTS, ModelSpec, TextEncoderSpec, family_spec
from modules.models.sd_model import SDModel
from modules.models.text_encoders import OpenCLIPTextModel

TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=(2,),
    num_res_blocks=1,
    channel_mult=(1, 2),
    num_heads=8,
    context_dim=32,
    transformer_depth=1,
    use_linear_in_transformer=False,
)
TINY_VAE = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4, embed_dim=4)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,  # hidden_size // 64, at least 1: what detection infers for SD1
    max_position_embeddings=77,
)


def tiny_spec(**overrides) -> ModelSpec:
    """The tiny model's spec; `unet` and `vae` overrides are merged into the defaults, a `text`
    dict into the text encoder's sizes, other fields replace them."""
    spec = ModelSpec(family="SD1", unet=dict(TINY_UNET), vae=dict(TINY_VAE),
                     text=(TextEncoderSpec("cond_stage_model", "clip", dict(TINY_TEXT)),))
    for name in ("unet", "vae"):
        if name in overrides:
            overrides[name] = {**getattr(spec, name), **overrides[name]}
    if isinstance(overrides.get("text"), dict):
        encoder = spec.text[0]
        overrides["text"] = (dataclasses.replace(encoder, size={**encoder.size, **overrides["text"]}),)
    return dataclasses.replace(spec, **overrides)


TINY_CLIP_L = dict(TINY_TEXT)
TINY_OPENCLIP = dict(width=32, layers=2, heads=1, embed_dim=32, vocab_size=49408, context_length=77)
# The real families' text layouts (detect.LAYOUTS) with tiny sizes; UNets with a fixed head width
# and linear projections as SD 2.x and SDXL have, and SDXL's level without attention.
TINY_FAMILIES = {
    "SD1": dict(unet={}, text=(TINY_CLIP_L,)),
    "SD2": dict(unet=dict(context_dim=32, use_linear_in_transformer=True), text=(TINY_OPENCLIP,)),
    "SDXL": dict(unet=dict(context_dim=64, use_linear_in_transformer=True, attention_resolutions=(2,),
                           transformer_depth=(0, 2), adm_in_channels=32 + 6 * 256), text=(TINY_CLIP_L, TINY_OPENCLIP)),
    "SDXL refiner": dict(unet=dict(context_dim=32, use_linear_in_transformer=True, attention_resolutions=(2,),
                                   transformer_depth=(0, 1), adm_in_channels=32 + 5 * 256), text=(TINY_OPENCLIP,)),
}


def tiny_family_spec(family: str, inpainting: bool = False, **overrides) -> ModelSpec:
    """A tiny model of `family` (a key of detect.LAYOUTS) with that family's defaults, 64 px."""
    sizes = TINY_FAMILIES[family]
    spec = family_spec(family, dict(TINY_UNET, **sizes["unet"]), sizes["text"], TINY_VAE, inpainting)
    if LAYOUTS[family].head_channels != -1:  # heads 8 wide, so that the tiny widths hold several
        spec = dataclasses.replace(spec, unet=dict(spec.unet, num_head_channels=8))
    return dataclasses.replace(spec, resolution=64, **overrides)


def tiny_family_model(family: str, seed: int = 0, inpainting: bool = False, **overrides) -> SDModel:
    with torch.random.fork_rng(devices=[]):
        model = SDModel(tiny_family_spec(family, inpainting, **overrides))
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every weight a seeded random value, norms near identity, projections scaled by
    1/sqrt(fan_in) so activations stay near unit size. Unlike default initialisation this is
    independent of the global RNG and of library versions, and nothing is zero (SD's training
    init zeroes output layers, which would make a random model's output trivially zero)."""
    g = torch.Generator().manual_seed(seed)

    def normal_(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            normal_(m.weight, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                normal_(m.bias, 0.1)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            normal_(m.weight, 0.1, mean=1.0)
            normal_(m.bias, 0.1)
        elif isinstance(m, nn.Embedding):
            normal_(m.weight, 1.0)
        elif isinstance(m, nn.MultiheadAttention):  # its output projection is a Linear, done above
            normal_(m.in_proj_weight, 1.0 / math.sqrt(m.embed_dim))
            normal_(m.in_proj_bias, 0.1)
        elif isinstance(m, OpenCLIPTextModel):
            normal_(m.positional_embedding, 0.1)
            normal_(m.text_projection, 1.0 / math.sqrt(m.text_projection.shape[0]))
            normal_(m.logit_scale, 0.1, mean=math.log(1 / 0.07))
    return module


def tiny_sd_model(seed: int = 0, **overrides) -> SDModel:
    """A tiny SDModel with weights determined by `seed` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        model = SDModel(tiny_spec(**overrides))
    randomize_(model, seed)
    return model.eval().requires_grad_(False)
