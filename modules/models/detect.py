"""Which kind of Stable Diffusion checkpoint a state dict is, and the sizes of its networks.

Pure: a state dict's shapes (names -> shapes), the file's metadata and the `.yaml` config beside
it (as plain data) in, a `ModelSpec` out. `FAMILIES` at the bottom lists every layout we
recognise, most specific first; `LAYOUTS` says, for each supported one, where its text encoders
live and what the weights cannot show (head width, prediction type, native size, latent scale).
Families that are recognised but not supported raise `UnsupportedModel` with a message for the user.

What the UNet predicts (noise or v) cannot be told from the keys. It is decided in this order:
the `.yaml` config (ldm's `parameterization: "v"`, sgm's `VScaling`), a `v_pred` key in the
state dict (some SDXL fine-tunes carry one), the file's metadata (`prediction`, or the Stability
model spec's `modelspec.prediction_type`), and last the family's default in `LAYOUTS`. A
`ztsnr` key marks a model trained with a zero-terminal-SNR schedule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_G = "conditioner.embedders.1.model."
REFINER_CLIP_G = "conditioner.embedders.0.model."

SD1_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025
SD1_RESOLUTION = 512
PREDICTIONS = ("eps", "v")


class DetectionError(ValueError):
    """The state dict is not a checkpoint we can build a model for; the message says why."""


class UnsupportedModel(DetectionError):
    """A known Stable Diffusion family that this program cannot run yet."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: where its module lives in the checkpoint (`prefix`, e.g.
    "cond_stage_model" or "conditioner.embedders.1"), its class (`kind`: "clip" or "openclip",
    see modules.models.text_encoders.ENCODERS) and constructor keyword arguments (`size`), the
    name embedding files and kohya LoRAs give it ("clip_l", "clip_h", "clip_g"), and whether its
    pooled vector is part of the UNet's vector input."""

    prefix: str
    kind: str
    size: dict[str, Any]
    name: str = "clip_l"
    pooled: bool = False

    @property
    def width(self) -> int:
        return self.size["hidden_size"] if self.kind == "clip" else self.size["width"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build an SDModel: the family name, the constructor keyword arguments
    of the UNet (`unet`) and the autoencoder (`vae`), and the text encoders (`text`)."""

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: tuple[TextEncoderSpec, ...]
    prediction: str = "eps"  # what the UNet predicts: "eps" (noise) or "v"
    scale_factor: float = SD1_SCALE_FACTOR  # latent = vae_latent * scale_factor
    resolution: int = SD1_RESOLUTION  # native image size in pixels
    # What the UNet's vector input (`label_emb`) holds besides the pooled text: "sdxl" (original
    # size, crop, target size) or "refiner" (original size, crop, aesthetic score); None: no input.
    vector: str | None = None
    ztsnr: bool = False  # trained with a zero-terminal-SNR noise schedule

    @property
    def text_width(self) -> int:
        """The context's width: the text encoders' widths added up (SDXL: 768 + 1280). A
        textual-inversion embedding's vectors are that wide, each encoder's part side by side."""
        return sum(e.width for e in self.text)


# ---- the supported layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A supported family: its text encoders as (prefix, kind, name, settings) and the defaults
    for what its weights cannot show."""

    family: str
    encoders: tuple[tuple[str, str, str, dict[str, Any]], ...]
    head_channels: int  # attention head width; -1: a fixed 8 heads (SD 1.x)
    prediction: str
    resolution: int
    scale_factor: float = SD1_SCALE_FACTOR
    vector: str | None = None

    def text_specs(self, sizes: Sequence[dict[str, Any]]) -> tuple[TextEncoderSpec, ...]:
        """The text encoders with these sizes (one dict per encoder) and the family's settings;
        the OpenCLIP encoder of a family with a vector input gives it its pooled text."""
        pooled = self.vector is not None
        return tuple(TextEncoderSpec(prefix, kind, dict(size) | settings, name, pooled=pooled and kind == "openclip")
                     for (prefix, kind, name, settings), size in zip(self.encoders, sizes, strict=True))

    @property
    def heads(self) -> dict[str, int]:
        """The UNet's head arguments: a fixed head width, or SD 1.x's 8 heads."""
        return {"num_heads": 8} if self.head_channels == -1 else {"num_head_channels": self.head_channels}


# SD 2.x and SDXL condition on the penultimate layer (`min_skip` 2, so CLIP skip 1 and 2 are the
# same); SD 2.x through the final layer norm, SDXL without it, as their reference code does. The
# OpenCLIP encoders pad with 0, SDXL's pooled vector comes from bigG's last layer.
_PENULTIMATE_NORMED = dict(min_skip=2, final_norm=True)
_PENULTIMATE_RAW = dict(min_skip=2, final_norm=False)
LAYOUTS: dict[str, Layout] = {
    "SD1": Layout("SD1", (("cond_stage_model", "clip", "clip_l", {}),), head_channels=-1,
                  prediction="eps", resolution=SD1_RESOLUTION),
    # Most SD 2.x models are 768 px v-prediction ones (2.0-v, 2.1 and their fine-tunes); a 512 px
    # epsilon model (2.0/2.1-base) needs its v2-inference.yaml beside it.
    "SD2": Layout("SD2", (("cond_stage_model", "openclip", "clip_h", dict(_PENULTIMATE_NORMED, pad_id=0)),),
                  head_channels=64, prediction="v", resolution=768),
    "SDXL": Layout("SDXL", (("conditioner.embedders.0", "clip", "clip_l", _PENULTIMATE_RAW),
                            ("conditioner.embedders.1", "openclip", "clip_g", dict(_PENULTIMATE_RAW, pad_id=0))),
                   head_channels=64, prediction="eps", resolution=1024, scale_factor=SDXL_SCALE_FACTOR, vector="sdxl"),
    "SDXL refiner": Layout("SDXL refiner", (("conditioner.embedders.0", "openclip", "clip_g", dict(_PENULTIMATE_RAW, pad_id=0)),),
                           head_channels=64, prediction="eps", resolution=1024, scale_factor=SDXL_SCALE_FACTOR,
                           vector="refiner"),
}
# The 2.x inpainting model (512-inpainting-ema) predicts noise at 512 px, unlike the 768-v default.
INPAINTING_DEFAULTS = {"SD2": dict(prediction="eps", resolution=512)}


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
    marks the level as attended. Head counts cannot be read off shapes: the family gives them.
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
        context_dim=shapes[context_key][1],
        transformer_depth=level_depths[0] if len(set(level_depths)) == 1 else tuple(level_depths),
        use_linear_in_transformer=len(proj_in) == 2,
    ) | ({"adm_in_channels": shapes[f"{prefix}label_emb.0.0.weight"][1]} if f"{prefix}label_emb.0.0.weight" in shapes else {})


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


def clip_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """The CLIPTextEncoder sizes of a transformers CLIP text model under `prefix` (…`text_model.`)."""
    vocab_size, hidden = shapes[f"{prefix}embeddings.token_embedding.weight"]
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=shapes[f"{prefix}embeddings.position_embedding.weight"][0],
    )


def openclip_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """The OpenCLIPTextEncoder sizes of an open_clip text tower under `prefix` (…`model.`)."""
    vocab_size, width = shapes[f"{prefix}token_embedding.weight"]
    return dict(
        width=width,
        layers=len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")),
        heads=max(1, width // 64),
        embed_dim=shapes[f"{prefix}text_projection"][1],
        vocab_size=vocab_size,
        context_length=shapes[f"{prefix}positional_embedding"][0],
    )


def _size_reader(kind: str) -> Callable[[Shapes, str], dict[str, Any]]:
    return {"clip": lambda shapes, prefix: clip_config(shapes, prefix + ".transformer.text_model."),
            "openclip": lambda shapes, prefix: openclip_config(shapes, prefix + ".model.")}[kind]


# ---- what the weights cannot show ----------------------------------------------------------------


def _get(data: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(data, Mapping) or name not in data:
            return None
        data = data[name]
    return data


def config_overrides(config: Mapping | None) -> dict[str, Any]:
    """What an ldm or sgm `.yaml` config (as plain data) says that the weights cannot: prediction,
    latent scale, native size and the UNet's attention heads. Keys it does not give are left out."""
    params = _get(config, "model", "params")
    if not isinstance(params, Mapping):
        return {}
    out: dict[str, Any] = {}
    if params.get("parameterization") in PREDICTIONS:  # ldm
        out["prediction"] = params["parameterization"]
    scaling = _get(params, "denoiser_config", "params", "scaling_config", "target")  # sgm
    if isinstance(scaling, str):
        out["prediction"] = "v" if scaling.rsplit(".", 1)[-1].startswith("VScaling") else "eps"
    if isinstance(params.get("scale_factor"), (int, float)):
        out["scale_factor"] = float(params["scale_factor"])
    unet = _get(params, "unet_config", "params") or _get(params, "network_config", "params") or {}
    if isinstance(unet.get("image_size"), int):  # the latent's side
        out["resolution"] = unet["image_size"] * 8
    if isinstance(unet.get("num_head_channels"), int) and unet["num_head_channels"] > 0:
        out["unet"] = dict(num_head_channels=unet["num_head_channels"])
    elif isinstance(unet.get("num_heads"), int) and unet["num_heads"] > 0:
        out["unet"] = dict(num_heads=unet["num_heads"], num_head_channels=-1)
    return out


def _metadata_prediction(metadata: Mapping[str, str]) -> str | None:
    if metadata.get("prediction") in PREDICTIONS:
        return metadata["prediction"]
    return {"epsilon": "eps", "v": "v"}.get(metadata.get("modelspec.prediction_type", ""))


def _number(metadata: Mapping[str, str], key: str, kind: type, default):
    try:
        return kind(metadata[key]) if key in metadata else default
    except ValueError as e:
        raise DetectionError(f"the file's metadata has a bad {key}: {metadata[key]!r}") from e


def _supported(layout: Layout) -> Callable[[Shapes, Mapping[str, str], Mapping], ModelSpec]:
    def build(shapes: Shapes, metadata: Mapping[str, str], config: Mapping) -> ModelSpec:
        unet = unet_config(shapes)
        family, defaults = layout.family, {}
        if unet["in_channels"] == 9 and unet["out_channels"] == 4:
            family, defaults = f"{layout.family} inpainting", INPAINTING_DEFAULTS.get(layout.family, {})
        elif unet["in_channels"] != 4:
            raise DetectionError(f"the UNet takes {unet['in_channels']} input channels; {layout.family} takes 4 "
                                 f"(9 for inpainting)")
        unet |= layout.heads
        overrides = config_overrides(config)
        unet |= overrides.get("unet", {})
        if "v_pred" in shapes:
            prediction = "v"
        else:
            prediction = _metadata_prediction(metadata) or defaults.get("prediction", layout.prediction)
        text = layout.text_specs([_size_reader(kind)(shapes, prefix) for prefix, kind, _name, _settings in layout.encoders])
        return ModelSpec(
            family=family,
            unet=unet,
            vae=vae_config(shapes),
            text=text,
            prediction=overrides.get("prediction", prediction),
            scale_factor=overrides.get("scale_factor", _number(metadata, "scale_factor", float, layout.scale_factor)),
            resolution=overrides.get("resolution",
                                     _number(metadata, "resolution", int, defaults.get("resolution", layout.resolution))),
            vector=layout.vector,
            ztsnr="ztsnr" in shapes,
        )

    return build


def family_spec(family: str, unet: dict[str, Any], text: Sequence[dict[str, Any]], vae: dict[str, Any],
                inpainting: bool = False) -> ModelSpec:
    """A model of `family` (a key of LAYOUTS) with these sizes (the UNet's without its input
    channels, one dict per text encoder) and the family's defaults, as detection gives them."""
    layout = LAYOUTS[family]
    spec = ModelSpec(family=family, unet=dict(unet, in_channels=9 if inpainting else 4) | layout.heads, vae=dict(vae),
                     text=layout.text_specs(text), prediction=layout.prediction, scale_factor=layout.scale_factor,
                     resolution=layout.resolution, vector=layout.vector)
    if inpainting:
        spec = replace(spec, family=f"{family} inpainting", **INPAINTING_DEFAULTS.get(family, {}))
    return spec


def full_size_spec(family: str, inpainting: bool = False) -> ModelSpec:
    """The spec of a family's released full-size model (SD 1.5, SD 2.1-v, SDXL base 1.0, SDXL
    refiner 1.0), from FULL_SIZES, for benchmarks and key-list tests."""
    sizes = FULL_SIZES[family]
    return family_spec(family, sizes["unet"], sizes["text"], SD_VAE, inpainting)


def sd15_spec() -> ModelSpec:
    """The sizes of Stable Diffusion 1.x (all of 1.1 to 1.5 and their fine-tunes)."""
    return full_size_spec("SD1")


SD_VAE = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4, embed_dim=4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)
OPENCLIP_H = dict(width=1024, layers=24, heads=16, embed_dim=1024, vocab_size=49408, context_length=77)
OPENCLIP_BIGG = dict(width=1280, layers=32, heads=20, embed_dim=1280, vocab_size=49408, context_length=77)
# The released models' sizes, from their reference configs (ldm v1-inference.yaml and
# v2-inference-v.yaml, sgm sd_xl_base.yaml and sd_xl_refiner.yaml).
FULL_SIZES: dict[str, dict[str, Any]] = {
    "SD1": dict(unet=dict(out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
                          channel_mult=(1, 2, 4, 4), context_dim=768, transformer_depth=1, use_linear_in_transformer=False),
                text=(CLIP_L,)),
    "SD2": dict(unet=dict(out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
                          channel_mult=(1, 2, 4, 4), context_dim=1024, transformer_depth=1, use_linear_in_transformer=True),
                text=(OPENCLIP_H,)),
    "SDXL": dict(unet=dict(out_channels=4, model_channels=320, attention_resolutions=(4, 2), num_res_blocks=2,
                           channel_mult=(1, 2, 4), context_dim=2048, transformer_depth=(0, 2, 10),
                           use_linear_in_transformer=True, adm_in_channels=2816),
                 text=(CLIP_L, OPENCLIP_BIGG)),
    "SDXL refiner": dict(unet=dict(out_channels=4, model_channels=384, attention_resolutions=(4, 2), num_res_blocks=2,
                                   channel_mult=(1, 2, 4, 4), context_dim=1280, transformer_depth=4,
                                   use_linear_in_transformer=True, adm_in_channels=2560),
                         text=(OPENCLIP_BIGG,)),
}


# ---- the family table ---------------------------------------------------------------------------


def _has(*prefixes: str) -> Callable[[Shapes], bool]:
    return lambda shapes: all(any(k.startswith(p) for k in shapes) for p in prefixes)


def _unsupported(name: str) -> Callable[[Shapes, Mapping[str, str], Mapping], ModelSpec]:
    def build(shapes, metadata, config):
        raise UnsupportedModel(f"this is a {name} checkpoint, which is not supported yet; "
                               f"SD 1.x, SD 2.x and SDXL (base, refiner, inpainting) checkpoints are")

    return build


def _misplaced(kind: str, folder: str) -> Callable[[Shapes, Mapping[str, str], Mapping], ModelSpec]:
    def build(shapes, metadata, config):
        raise DetectionError(f"this is a {kind} file, not a Stable Diffusion checkpoint; put it in {folder}")

    return build


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[Shapes], bool]
    build: Callable[[Shapes, Mapping[str, str], Mapping], ModelSpec]


def _lora(shapes: Shapes) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in shapes)


# First match wins: the specific layouts come before the general ones they share keys with.
FAMILIES: tuple[Family, ...] = (
    Family("SD3", _has(UNET + "joint_blocks."), _unsupported("Stable Diffusion 3")),
    Family("Flux", lambda s: _has(UNET + "double_blocks.")(s) or _has("double_blocks.")(s), _unsupported("Flux")),
    Family("SDXL", _has(UNET, VAE, SDXL_CLIP_L, SDXL_CLIP_G), _supported(LAYOUTS["SDXL"])),
    Family("SDXL refiner", _has(UNET, VAE, REFINER_CLIP_G), _supported(LAYOUTS["SDXL refiner"])),
    Family("SD2 depth", _has(UNET, "depth_model."), _unsupported("Stable Diffusion 2 depth")),
    Family("SD2", _has(UNET, VAE, OPENCLIP), _supported(LAYOUTS["SD2"])),
    Family("SD1", _has(UNET, VAE, CLIP), _supported(LAYOUTS["SD1"])),
    Family("VAE", _has("encoder.conv_in.", "decoder.conv_in."), _misplaced("VAE", "models/VAE")),
    Family("LoRA", _lora, _misplaced("LoRA", "models/Lora")),
)


def detect(shapes: Shapes, metadata: Mapping[str, str] | None = None, config: Mapping | None = None) -> ModelSpec:
    """The ModelSpec of a checkpoint from its tensor shapes (key -> shape), file metadata and
    `.yaml` config (plain data, or None)."""
    metadata = metadata or {}
    for family in FAMILIES:
        if family.matches(shapes):
            try:
                return family.build(shapes, metadata, config or {})
            except KeyError as e:
                raise DetectionError(f"looks like {family.name} but has no {e.args[0]!r} tensor; the file may be damaged") from e
    raise DetectionError(
        "not a Stable Diffusion checkpoint: no UNet (model.diffusion_model.*), VAE (first_stage_model.*) "
        "and text encoder (cond_stage_model.* or conditioner.embedders.*) weights found"
    )
