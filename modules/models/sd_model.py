"""SDModel: the UNet, the VAE and the text encoder of one checkpoint, composed so that
`state_dict()` keys are the original SD 1.x checkpoint keys."""

from __future__ import annotations

import torch
from torch import nn

from modules.models.detect import ModelSpec
from modules.models.text_encoders import CLIPTextEncoder
from modules.models.unet import UNetModel
from modules.models.vae import AutoencoderKL


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The noise schedule SD 1.x/2.x were trained with (betas linear in sqrt space)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The forward process: latents x0 at the noise level whose cumulative alpha is alpha_bar
    (a scalar, or one per sample shaped to broadcast), with the given unit noise."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


# What the UNet learns to predict, by SDModel.prediction, from clean latents x0, the unit noise
# and alpha_bar as `noised` takes them. v = sqrt(a) * noise - sqrt(1 - a) * x0 tends to -x0 at
# the noisiest steps, so there the loss is on the picture itself rather than on the noise.
DIFFUSION_TARGETS = {
    "eps": lambda x0, noise, alpha_bar: noise,
    "v": lambda x0, noise, alpha_bar: alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0,
}


def diffusion_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return DIFFUSION_TARGETS[prediction](x0, noise, alpha_bar)


class DiffusionWrapper(nn.Module):
    """Holds the UNet under `model.diffusion_model`, where the checkpoints keep it."""

    def __init__(self, diffusion_model: UNetModel):
        super().__init__()
        self.diffusion_model = diffusion_model


class SDModel(nn.Module):
    """Built from a ModelSpec (see modules/models/detect.py): `spec.unet`, `spec.vae` and
    `spec.text` are the constructor keyword arguments of the three networks."""

    def __init__(self, spec: ModelSpec, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.model = DiffusionWrapper(UNetModel(**spec.unet))
        self.first_stage_model = AutoencoderKL(**spec.vae)
        self.cond_stage_model = CLIPTextEncoder(**spec.text)
        self.scale_factor = float(spec.scale_factor)
        self.prediction = spec.prediction
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod()
        # Not saved: the checkpoint keys are the networks' weights only.
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float32), persistent=False)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def latent_channels(self) -> int:
        return self.first_stage_model.post_quant_conv.in_channels

    @property
    def concat_channels(self) -> int:
        """Channels the UNet takes besides the latent: 5 for inpainting models (mask and
        masked-image latent, given as c_concat), 0 for the others."""
        return self.spec.unet["in_channels"] - self.latent_channels

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side."""
        return self.first_stage_model.downscale

    def apply_model(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, c_concat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """UNet output (eps or v, see `prediction`) for latents x at timesteps t, in x's dtype.
        c_concat (mask and masked-image latents) is stacked on the channels for inpainting UNets."""
        if c_concat is not None:
            x_in = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        else:
            x_in = x
        return self.model.diffusion_model(x_in, t, context).to(x.dtype)

    def encode_first_stage(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent: a sample of the posterior drawn with `generator`,
        or its mean when no generator is given."""
        mean, logvar = self.first_stage_model.encode(img)
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return (z * self.scale_factor).to(img.dtype)

    def decode_first_stage(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in (about) [-1, 1], in the latent's dtype."""
        return self.first_stage_model.decode(latent / self.scale_factor).to(latent.dtype)

    def encode_text(self, tokens: torch.Tensor, clip_skip: int = 1, replace=()) -> torch.Tensor:
        """See CLIPTextEncoder.forward; `replace` puts embedding vectors at token positions."""
        return self.cond_stage_model(tokens, clip_skip, replace)


def build_model(spec: ModelSpec, device: str = "cpu", alphas_cumprod=None) -> SDModel:
    """The SDModel for `spec`. On device "meta" no memory is allocated and nothing is
    initialised: that model is a skeleton to `load_state_dict(..., assign=True)` into."""
    with torch.device(device):
        return SDModel(spec, alphas_cumprod=alphas_cumprod)
