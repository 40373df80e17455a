"""Which kind of Stable Diffusion checkpoint a state dict is, and the sizes of its networks.

Pure: a state dict (names -> tensors, only `.shape` is read) and the file's metadata in, a
`ModelSpec` out. The family table at the bottom lists every layout we recognise; families that
are recognised but not supported raise `UnsupportedModel` with a message for the user.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."

SD1_SCALE_FACTOR = 0.18215
SD1_RESOLUTION = 512


class DetectionError(ValueError):
    """The state dict is not a checkpoint we can build a model for; the message says why."""


class UnsupportedModel(DetectionError):
    """A known Stable Diffusion family that this program cannot run yet."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build an SDModel: the family name and the constructor keyword
    arguments of the UNet (`unet`), the autoencoder (`vae`) and the text encoder (`text`)."""

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    prediction: str = "eps"  # what the UNet predicts: "eps" (noise) or "v"
    scale_factor: float = SD1_SCALE_FACTOR  # latent = vae_latent * scale_factor
    resolution: int = SD1_RESOLUTION  # native image size in pixels


def sd15_spec() -> ModelSpec:
    """The sizes of Stable Diffusion 1.x (all of 1.1 to 1.5 and their fine-tunes)."""
    return ModelSpec(
        family="SD1",
        unet=dict(
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=(4, 2, 1),
            num_res_blocks=2,
            channel_mult=(1, 2, 4, 4),
            num_heads=8,
            context_dim=768,
            transformer_depth=1,
            use_linear_in_transformer=False,
        ),
        vae=dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4, embed_dim=4),
        text=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        ),
    )


# ---- reading sizes off the state dict -----------------------------------------------------------

Shapes = Mapping[str, tuple[int, ...]]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The sorted distinct integers N for which some key matches `pattern` (a regex with one group)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def unet_config(shapes: Shapes, prefix: str = UNET) -> dict[str, Any]:
    """The UNetModel keyword arguments of an ldm UNet state dict.

    The input blocks are read in order: a ResBlock (`N.0.in_layers`) adds to the current level, a
    Downsample (`N.0.op`) closes it, and a SpatialTransformer beside a ResBlock (`N.1.proj_in`)
    marks the level as attended. Head counts cannot be read off shapes: SD 1.x uses 8 heads.
    """
    first = shapes[f"{prefix}input_blocks.0.0.weight"]
    model_channels, in_channels = first[0], first[1]
    mults, blocks_per_level, attended, depths = [], [0], [], []
    level_mult = None
    for n in _indices(shapes, re.escape(prefix) + r"input_blocks\.(\d+)\.")[1:]:
        block = f"{prefix}input_blocks.{n}."
        if f"{block}0.op.weight" in shapes:
            mults.append(level_mult)
            blocks_per_level.append(0)
            continue
        level_mult = shapes[f"{block}0.in_layers.2.weight"][0] // model_channels
        blocks_per_level[-1] += 1
        if f"{block}1.proj_in.weight" in shapes:
            level = len(blocks_per_level) - 1
            if not attended or attended[-1] != level:
                attended.append(level)
                depths.append(len(_indices(shapes, re.escape(block) + r"1\.transformer_blocks\.(\d+)\.")))
    mults.append(level_mult)
    if len(set(blocks_per_level)) != 1:
        raise DetectionError(f"UNet levels have different numbers of ResBlocks ({blocks_per_level})")
    middle_depth = len(_indices(shapes, re.escape(prefix) + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    depth_by_level = dict(zip(attended, depths))
    # A level without attention takes the middle block's depth: UNetModel gives its last entry to the middle.
    level_depths = [depth_by_level.get(level, middle_depth) for level in range(len(mults))]
    proj_in = shapes[f"{prefix}middle_block.1.proj_in.weight"]
    context_key = next(k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight"))
    return dict(
        in_channels=in_channels,
        out_channels=shapes[f"{prefix}out.2.weight"][0],
        model_channels=model_channels,
        attention_resolutions=tuple(2**level for level in attended),
        num_res_blocks=blocks_per_level[0],
        channel_mult=tuple(mults),
        num_heads=8,
        context_dim=shapes[context_key][1],
        transformer_depth=level_depths[0] if len(set(level_depths)) == 1 else tuple(level_depths),
        use_linear_in_transformer=len(proj_in) == 2,
    )


def vae_config(shapes: Shapes, prefix: str = VAE) -> dict[str, Any]:
    """The AutoencoderKL keyword arguments of a KL autoencoder state dict."""
    conv_in = shapes[f"{prefix}encoder.conv_in.weight"]
    ch = conv_in[0]
    levels = _indices(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mults = [shapes[f"{prefix}encoder.down.{level}.block.0.conv1.weight"][0] // ch for level in levels]
    return dict(
        ch=ch,
        ch_mult=tuple(mults),
        num_res_blocks=len(_indices(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")),
        in_channels=conv_in[1],
        out_ch=shapes[f"{prefix}decoder.conv_out.weight"][0],
        z_channels=shapes[f"{prefix}decoder.conv_in.weight"][1],
        embed_dim=shapes[f"{prefix}post_quant_conv.weight"][1],
    )


def clip_config(shapes: Shapes, prefix: str = CLIP) -> dict[str, Any]:
    """The CLIPTextEncoder keyword arguments of a transformers CLIP text model state dict."""
    vocab_size, hidden = shapes[f"{prefix}embeddings.token_embedding.weight"]
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=shapes[f"{prefix}embeddings.position_embedding.weight"][0],
    )


# ---- the family table ---------------------------------------------------------------------------


def _has(*prefixes: str) -> Callable[[Shapes], bool]:
    return lambda shapes: all(any(k.startswith(p) for k in shapes) for p in prefixes)


def _unsupported(name: str) -> Callable[[Shapes, Mapping[str, str]], ModelSpec]:
    def build(shapes, metadata):
        raise UnsupportedModel(f"this is a {name} checkpoint, which is not supported yet; SD 1.x checkpoints are")

    return build


def _misplaced(kind: str, folder: str) -> Callable[[Shapes, Mapping[str, str]], ModelSpec]:
    def build(shapes, metadata):
        raise DetectionError(f"this is a {kind} file, not a Stable Diffusion checkpoint; put it in {folder}")

    return build


def _sd1(shapes: Shapes, metadata: Mapping[str, str]) -> ModelSpec:
    unet = unet_config(shapes)
    family = {4: "SD1", 9: "SD1 inpainting"}.get(unet["in_channels"])
    if family is None:
        raise DetectionError(f"the UNet takes {unet['in_channels']} input channels; SD 1.x takes 4 (9 for inpainting)")
    try:
        return ModelSpec(
            family=family,
            unet=unet,
            vae=vae_config(shapes),
            text=clip_config(shapes),
            prediction=metadata.get("prediction", "eps"),
            scale_factor=float(metadata.get("scale_factor", SD1_SCALE_FACTOR)),
            resolution=int(metadata.get("resolution", SD1_RESOLUTION)),
        )
    except ValueError as e:
        raise DetectionError(f"the file's metadata has a bad value: {e}") from e


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[Shapes], bool]
    build: Callable[[Shapes, Mapping[str, str]], ModelSpec]


# First match wins: the specific layouts come before the general ones they share keys with.
FAMILIES: tuple[Family, ...] = (
    Family("SDXL", _has("conditioner.embedders."), _unsupported("SDXL")),
    Family("SD3", _has(UNET + "joint_blocks."), _unsupported("Stable Diffusion 3")),
    Family("Flux", _has(UNET + "double_blocks."), _unsupported("Flux")),
    Family("SD2", _has(UNET, "cond_stage_model.model."), _unsupported("Stable Diffusion 2.x")),
    Family("SD1", _has(UNET, VAE, CLIP), _sd1),
    Family("VAE", _has("encoder.conv_in.", "decoder.conv_in."), _misplaced("VAE", "models/VAE")),
    Family("LoRA", lambda s: any(k.startswith(("lora_unet_", "lora_te_")) for k in s), _misplaced("LoRA", "models/Lora")),
)


def detect(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> ModelSpec:
    """The ModelSpec of a checkpoint from its tensor shapes (key -> shape) and file metadata."""
    metadata = metadata or {}
    for family in FAMILIES:
        if family.matches(shapes):
            try:
                return family.build(shapes, metadata)
            except KeyError as e:
                raise DetectionError(f"looks like {family.name} but has no {e.args[0]!r} tensor; the file may be damaged") from e
    raise DetectionError(
        "not a Stable Diffusion checkpoint: no UNet (model.diffusion_model.*), VAE (first_stage_model.*) "
        "and CLIP text encoder (cond_stage_model.transformer.*) weights found"
    )
