"""SDModel: the UNet, the VAE and the text encoders of one checkpoint, composed so that
`state_dict()` keys are the original checkpoint keys of its family (SD 1.x and 2.x keep their
text encoder under `cond_stage_model.`, SDXL under `conditioner.embedders.N.`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from modules.models.detect import ModelSpec
from modules.models.text_encoders import ENCODERS, Replacement
from modules.models.unet import UNetModel, timestep_embedding
from modules.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

# SDXL's size and aesthetic-score numbers each enter the UNet's vector as a sinusoidal
# embedding this wide, as in sgm's ConcatTimestepEmbedderND.
SIZE_EMBEDDING = 256
# The aesthetic scores A1111 gives the SDXL refiner for the prompt and the negative prompt.
REFINER_SCORES = {False: 6.0, True: 2.5}


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The noise schedule SD 1.x/2.x were trained with (betas linear in sqrt space)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so that the last step is pure noise (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"): sqrt(alpha_bar) shifted to end at 0
    and stretched to keep its first value. The last value is set just above 0, as A1111 does, so
    that the largest sigma stays finite."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    rescaled = root**2
    rescaled[-1] = 4.8973451890853435e-08
    return rescaled.to(torch.float32)


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


class Conditioner(nn.Module):
    """Holds SDXL's text encoders under `embedders.N`, where sgm's GeneralConditioner keeps them."""

    def __init__(self, encoders: Sequence[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(encoders)


class SDModel(nn.Module):
    """Built from a ModelSpec (see modules/models/detect.py): `spec.unet` and `spec.vae` are the
    constructor keyword arguments of the UNet and the autoencoder, `spec.text` lists the text
    encoders (class, sizes, and where they live)."""

    def __init__(self, spec: ModelSpec, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.model = DiffusionWrapper(UNetModel(**spec.unet))
        self.first_stage_model = AutoencoderKL(**spec.vae)
        encoders = [ENCODERS[e.kind](**e.size) for e in spec.text]
        if [e.prefix for e in spec.text] == ["cond_stage_model"]:
            self.cond_stage_model = encoders[0]
        else:
            self.conditioner = Conditioner(encoders)
        self.scale_factor = float(spec.scale_factor)
        self.prediction = spec.prediction
        # What a float16 VAE that overflows is put in (see decode_first_stage); the device policy
        # chooses (memory.place).
        self.vae_fallback_dtype = torch.float32
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod()
        if spec.ztsnr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
        # Not saved: the checkpoint keys are the networks' weights only.
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float32), persistent=False)

    @property
    def text_model(self) -> nn.Module:
        """The module holding every text encoder (`cond_stage_model` or `conditioner`)."""
        return self.conditioner if hasattr(self, "conditioner") else self.cond_stage_model

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders in the order of `spec.text`."""
        return list(self.conditioner.embedders) if hasattr(self, "conditioner") else [self.cond_stage_model]

    @property
    def text_width(self) -> int:
        return self.spec.text_width

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
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, c_concat: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output (eps or v, see `prediction`) for latents x at timesteps t, in x's dtype.
        c_concat (mask and masked-image latents) is stacked on the channels for inpainting UNets;
        y is the vector input of SDXL UNets (see `vector`)."""
        if c_concat is not None:
            x_in = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        else:
            x_in = x
        return self.model.diffusion_model(x_in, t, context, y).to(x.dtype)

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
        """Scaled latent -> image in (about) [-1, 1], in the latent's dtype.

        SDXL's VAE overflows in float16 (black or NaN pictures). When a half-precision decode
        gives NaN or inf, the VAE is put in `vae_fallback_dtype` (float32; bfloat16, of float32's
        range in half the memory, where the policy saves memory) for good (the checkpoint's next
        load follows the policy again) and the latent decoded again, as A1111 does;
        --no-half-vae starts in float32. A bfloat16 VAE that gives NaN goes to float32."""
        vae = self.first_stage_model
        decoded = vae.decode(latent / self.scale_factor)
        if vae.dtype != torch.float32 and not bool(torch.isfinite(decoded).all()):
            fallback = self.vae_fallback_dtype if vae.dtype == torch.float16 else torch.float32
            name = str(fallback).removeprefix("torch.")
            log.warning("The VAE gave NaN or infinite values in %s; decoding in %s from now on for this model "
                        "(start with --no-half-vae to decode in float32 from the first picture).",
                        str(vae.dtype).removeprefix("torch."), name)
            vae.to(fallback)
            decoded = vae.decode(latent.to(fallback) / self.scale_factor)
        return decoded.to(latent.dtype)

    def encode_text(self, tokens: torch.Tensor, clip_skip: int = 1,
                    replace: Sequence[Replacement] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk rows [B, 77] -> (context [B, 77, text_width], pooled [B, n] or None): every
        encoder's hidden states side by side (SDXL: CLIP ViT-L's 768 then bigG's 1280) and the
        pooled vector of the encoder that makes one. `replace` holds (row, position, vectors
        [n, text_width]): textual-inversion vectors put in place of token embeddings, each
        encoder taking its own slice of their width."""
        widths = [e.width for e in self.spec.text]
        parts = [(row, position, vectors.split(widths, dim=1)) for row, position, vectors in replace]
        contexts, pooled = [], None
        for index, (encoder, spec) in enumerate(zip(self.text_encoders, self.spec.text)):
            placed = [(row, position, split[index]) for row, position, split in parts]
            if spec.pooled:
                hidden, pooled = encoder(tokens, clip_skip, placed, pooled=True)
            else:
                hidden = encoder(tokens, clip_skip, placed)
            contexts.append(hidden)
        return torch.cat(contexts, dim=-1) if len(contexts) > 1 else contexts[0], pooled

    def vector(self, pooled: torch.Tensor, width: int, height: int, negative: bool = False) -> torch.Tensor | None:
        """The UNet's vector input for one prompt's pooled text [n] and a picture of width x
        height, as SDXL was trained: the pooled text, then sinusoidal embeddings of the original
        size (height, width), the crop's top-left corner (0, 0), and the target size (base) or
        the aesthetic score (refiner, 2.5 for a negative prompt and 6.0 otherwise, as A1111).
        None for models without a vector input."""
        if self.spec.vector is None:
            return None
        numbers = [height, width, 0, 0]
        numbers += [height, width] if self.spec.vector == "sdxl" else [REFINER_SCORES[negative]]
        sizes = timestep_embedding(torch.tensor(numbers, dtype=torch.float32, device=pooled.device), SIZE_EMBEDDING)
        return torch.cat([pooled.float(), sizes.flatten()]).to(pooled.dtype)


def build_model(spec: ModelSpec, device: str = "cpu", alphas_cumprod=None) -> SDModel:
    """The SDModel for `spec`. On device "meta" no memory is allocated and nothing is
    initialised: that model is a skeleton to `load_state_dict(..., assign=True)` into."""
    with torch.device(device):
        return SDModel(spec, alphas_cumprod=alphas_cumprod)
