"""Independent implementations holding our networks' weights: diffusers' UNet2DConditionModel and
AutoencoderKL, built from our ldm/sgm-layout state dicts by diffusers' own single-file conversion
(SD 1.x, 2.x and SDXL UNets alike: `unet_kwargs` decide which config diffusers is shown).

    theirs = diffusers_unet(unet_kwargs, ours)          # ours: modules.models.unet.UNetModel
    theirs = diffusers_vae(vae_kwargs, ours_vae)        # ours_vae: modules.models.vae.AutoencoderKL

Used by tests/test_reference.py (outputs must agree) and bench/unet_step.py (same weights, timed
side by side). The diffusers model is built on the meta device and the converted tensors are
assigned into it: nothing is initialised, and for SD 1.5 sizes that saves seconds and 3.4 GB.
The two models may share weight storage, so neither should be trained or modified in place.
"""

from __future__ import annotations

import warnings

import torch

# Only the VAE's number of levels is read when converting a UNet (for diffusers' sample_size).
SD_VAE_KWARGS = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4, embed_dim=4)


def original_config(unet_kwargs: dict, vae_kwargs: dict) -> dict:
    """The slice of an ldm (SD 1.x/2.x) or sgm (SDXL) YAML config that diffusers' conversion
    helpers read, for the UNet that `unet_kwargs` builds."""
    unet = dict(unet_kwargs)
    # The configs give a head count (SD 1.x) or a head width (2.x, SDXL), never both; diffusers
    # takes num_heads whenever it is there.
    if unet.get("num_head_channels", -1) != -1:
        unet.pop("num_heads", None)
    params = {"scale_factor": 0.18215, "first_stage_config": {"params": {"ddconfig": dict(vae_kwargs)}}}
    if unet.get("adm_in_channels") is not None:
        # sgm keeps the UNet under network_config and marks the vector input as num_classes
        # "sequential". diffusers then makes label_emb SDXL's text_time embedding only for a
        # context 2048 (base) or 1280 (refiner) wide, a plain projection otherwise.
        unet["num_classes"] = "sequential"
        params["network_config"] = {"params": unet}
    else:
        unet.pop("adm_in_channels", None)
        params["unet_config"] = {"params": unet}
    return {"model": {"params": params}}


def _assigned(model_class, config: dict, converted: dict[str, torch.Tensor]):
    with torch.device("meta"):
        model = model_class(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{model_class.__name__}: not filled by the conversion: {left[:5]}")
    return model.eval()


def diffusers_unet_config(unet_kwargs: dict, unet: torch.nn.Module, vae_kwargs: dict = SD_VAE_KWARGS) -> dict:
    """The UNet2DConditionModel config diffusers' single-file loading makes for `unet` (built by
    `unet_kwargs`; on the meta device too, as only its keys and shapes are read)."""
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes about image_size, irrelevant here
        return sfu.create_unet_diffusers_config_from_ldm(original_config(unet_kwargs, vae_kwargs), checkpoint, image_size=256)


def diffusers_unet(unet_kwargs: dict, unet: torch.nn.Module, vae_kwargs: dict = SD_VAE_KWARGS):
    """A diffusers UNet2DConditionModel holding `unet`'s weights (`unet_kwargs` built it)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = diffusers_unet_config(unet_kwargs, unet, vae_kwargs)
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    return _assigned(UNet2DConditionModel, config, converted)


def diffusers_vae(vae_kwargs: dict, vae: torch.nn.Module, unet_kwargs: dict | None = None):
    """A diffusers AutoencoderKL holding `vae`'s weights (`vae_kwargs` built it)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_vae_diffusers_config_from_ldm(
            original_config(unet_kwargs or {}, vae_kwargs), checkpoint, image_size=256
        )
        converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    return _assigned(DiffusersAutoencoderKL, config, converted)
