"""LoRA networks in kohya-ss's format, applied to the model for one generation and then removed.

A prompt calls one with `<lora:name:weight>` (see modules.extra_networks); `name` is a file in
models/Lora without its extension. A kohya file holds, per adapted layer,

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in(, kh, kw)]
    ....lora_up.weight  [out, r(, 1, 1)]          ....alpha  (scalar; missing means alpha = r)

and the layer's weight becomes W + weight * alpha / r * (up @ down). The names are module paths
with "_" for ".", and `layer_targets` lists every weight a LoRA can change under each name it
may have:

- UNet (`lora_unet_`): diffusers' UNet2DConditionModel paths (kohya's SD 1.x/2.x trainers), which
  our ldm-layout UNet (input_blocks.4.1...) does not have, so they are derived from the network's
  own structure block by block (`_block_names`, `RENAMES`) the way diffusers' single-file
  conversion pairs the two layouts; and the ldm paths themselves (lora_unet_input_blocks_4_1_...),
  which kohya's SDXL trainer writes, its UNet having the original layout.
- Text encoders: kohya names every encoder in transformers' CLIPTextModel layout
  (text_model_encoder_layers_N_self_attn_q_proj, ..._mlp_fc1), a lone one as `lora_te_` (SD 1.x,
  SD 2.x, SDXL refiner) and SDXL's two as `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP
  bigG). Our OpenCLIP towers keep open_clip's layout, where q, k and v are the three row blocks
  of one fused `attn.in_proj_weight` [3 * width, width]: a q/k/v LoRA changes its block of rows
  only (a `Target` with `rows`); out_proj, fc1 and fc2 are attn.out_proj, mlp.c_fc and mlp.c_proj.
  open_clip's own paths (lora_te2_model_transformer_resblocks_N_mlp_c_fc, ..._attn_in_proj for
  the fused weight) are listed too.

Bit-identity afterwards: `apply` computes each touched weight anew (a float32 copy of W plus the
deltas, each on its rows, rounded once to W's dtype) as a new tensor, puts it in the parameter's
place, and keeps the original tensor itself; `restore` puts the originals back. The original
tensors are never written to, so the model after a generation holds exactly the tensors it held
before, whatever the dtype; subtracting the delta again would not give W back bit for bit in half
precision. Forward hooks adding a low-rank term would also leave the weights alone, but cost time
at every step of every layer, where a merged weight costs nothing after the one-off merge.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modules.app.errors import RequestError
from modules.models import loader
from modules.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample
from modules.prompting.extra_networks import NetworkCall, parse_extra_networks

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".ckpt")
SHORT_HASH = 12  # A1111's "Lora hashes" show this many hex digits
UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
# What each tensor of a kohya layer is called, after the layer's name and a dot.
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Tensor names of LoRA-like formats that this module does not apply, and what they are.
OTHER_FORMATS = {
    "hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lora_mid.weight": "LyCORIS LoCon with a Tucker core",
    "oft_blocks": "OFT", "dora_scale": "DoRA", "diff": "LyCORIS full-weight difference",
    "lora_A.weight": "diffusers/PEFT", "lora.down.weight": "diffusers",
}


class LoraError(RequestError):
    """A LoRA that cannot be used as asked; the message names it and says why."""


# ---- kohya names of our modules -----------------------------------------------------------------

# Inside a block: our attribute path -> diffusers' (paths not listed are the same in both).
RENAMES: dict[type, dict[str, str]] = {
    ResBlock: {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"},
    Downsample: {"op": "conv"},
    Upsample: {},
    SpatialTransformer: {},
}
# Top-level UNet layers that a LoRA can adapt: ours -> diffusers'. SDXL's vector input
# (label_emb) is diffusers' add_embedding; only UNets that have one list it.
TOP_LEVEL = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
             "label_emb.0.2": "add_embedding.linear_2", "out.2": "conv_out"}


def _place(layer: nn.Module, index: int) -> str:
    """A layer's name inside a diffusers down/mid/up block, `index` counting the block's layers."""
    return {ResBlock: f"resnets.{index}", SpatialTransformer: f"attentions.{index}",
            Downsample: "downsamplers.0", Upsample: "upsamplers.0"}[type(layer)]


def _block_names(unet) -> dict[str, tuple[str, nn.Module]]:
    """Our path of every block layer -> (diffusers' path, the layer). diffusers counts layers per
    resolution level: a level's down block ends at its Downsample, its up block at its Upsample.
    Levels without attention (SDXL's first) have resnets only, which this counts the same way."""
    names: dict[str, tuple[str, nn.Module]] = {}
    level = index = 0
    for k, block in enumerate(unet.input_blocks):
        if k == 0:
            continue  # conv_in, in TOP_LEVEL
        for i, layer in enumerate(block):
            names[f"input_blocks.{k}.{i}"] = (f"down_blocks.{level}.{_place(layer, index)}", layer)
        level, index = (level + 1, 0) if isinstance(block[0], Downsample) else (level, index + 1)
    for i, layer in enumerate(unet.middle_block):
        names[f"middle_block.{i}"] = (f"mid_block.{_place(layer, i // 2)}", layer)  # resnet, attention, resnet
    level = index = 0
    for k, block in enumerate(unet.output_blocks):
        for i, layer in enumerate(block):
            names[f"output_blocks.{k}.{i}"] = (f"up_blocks.{level}.{_place(layer, index)}", layer)
        level, index = (level + 1, 0) if isinstance(block[-1], Upsample) else (level, index + 1)
    return names


def unet_diffusers_paths(unet) -> dict[str, str]:
    """Our path of every Linear and Conv2d of the UNet -> its path in diffusers' UNet2DConditionModel."""
    paths = {}
    for ours, (theirs, layer) in _block_names(unet).items():
        renames = RENAMES[type(layer)]
        for inner, module in layer.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                paths[f"{ours}.{inner}"] = f"{theirs}.{renames.get(inner, inner)}"
    modules = dict(unet.named_modules())
    for ours, theirs in TOP_LEVEL.items():
        if ours in modules:
            paths[ours] = theirs
    return paths


@dataclass(frozen=True, eq=False)
class Target:
    """Where a kohya layer's change goes: the parameter `weight`, or only its `rows` (the q, k or
    v block of a fused in_proj_weight); `text` says that the prompt's text-encoder multiplier
    applies rather than the UNet's."""

    weight: nn.Parameter
    rows: slice | None = None
    text: bool = False

    @property
    def shape(self) -> torch.Size:
        if self.rows is None:
            return self.weight.shape
        return torch.Size((self.rows.stop - self.rows.start, *self.weight.shape[1:]))


def text_prefixes(count: int) -> list[str]:
    """kohya's prefix for each of a model's `count` text encoders, in the model's order: a lone
    encoder is lora_te_, SDXL's two are lora_te1_ (CLIP ViT-L) and lora_te2_ (OpenCLIP bigG)."""
    return [TEXT_PREFIX] if count == 1 else [f"lora_te{i}_" for i in range(1, count + 1)]


def _clip_targets(encoder, prefix: str) -> dict[str, Target]:
    """transformers' CLIPTextModel: the file's names are our paths under `transformer`."""
    return {prefix + path.replace(".", "_"): Target(module.weight, text=True)
            for path, module in encoder.transformer.named_modules() if isinstance(module, nn.Linear)}


def _openclip_targets(encoder, prefix: str) -> dict[str, Target]:
    """An open_clip text tower under the CLIPTextModel names kohya trains it with (kohya converts
    the tower to transformers' layout, splitting in_proj into q, k, v in that order), and under
    its own module paths."""
    targets = {}
    for path, module in encoder.named_modules():
        name = prefix + path.replace(".", "_")
        if isinstance(module, nn.Linear):
            targets[name] = Target(module.weight, text=True)
        elif isinstance(module, nn.MultiheadAttention):
            targets[name + "_in_proj"] = Target(module.in_proj_weight, text=True)
    for n, block in enumerate(encoder.model.transformer.resblocks):
        layer = f"{prefix}text_model_encoder_layers_{n}_"
        width = block.attn.embed_dim
        for i, part in enumerate("qkv"):
            rows = slice(i * width, (i + 1) * width)
            targets[f"{layer}self_attn_{part}_proj"] = Target(block.attn.in_proj_weight, rows, text=True)
        targets[f"{layer}self_attn_out_proj"] = Target(block.attn.out_proj.weight, text=True)
        targets[f"{layer}mlp_fc1"] = Target(block.mlp.c_fc.weight, text=True)
        targets[f"{layer}mlp_fc2"] = Target(block.mlp.c_proj.weight, text=True)
    return targets


TEXT_TARGETS = {"clip": _clip_targets, "openclip": _openclip_targets}


def layer_targets(sd_model) -> dict[str, Target]:
    """kohya layer name -> where its change goes, for the UNet (diffusers and ldm spellings) and
    every text encoder."""
    unet = sd_model.model.diffusion_model
    modules = dict(unet.named_modules())
    targets = {}
    for ours, theirs in unet_diffusers_paths(unet).items():
        target = Target(modules[ours].weight)
        targets[UNET_PREFIX + theirs.replace(".", "_")] = target
        targets[UNET_PREFIX + ours.replace(".", "_")] = target
    encoders = sd_model.text_encoders
    for encoder, spec, prefix in zip(encoders, sd_model.spec.text, text_prefixes(len(encoders))):
        targets.update(TEXT_TARGETS[spec.kind](encoder, prefix))
    return targets


# ---- files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """alpha / rank * up @ down in float32 on `device`, shaped like the weight it adapts. A
        3x3 conv LoRA has a 3x3 `down` and a 1x1 `up`, whose product is again a 3x3 kernel."""
        rank = self.down.shape[0]
        product = self.up.to(device).float().flatten(1) @ self.down.to(device).float().flatten(1)
        scale = self.alpha / rank if self.alpha is not None else 1.0
        return (product * scale).reshape(shape)

    def fits(self, shape: torch.Size) -> bool:
        """Whether up @ down makes a weight of `shape` (a 1x1 conv LoRA fits a Linear and back)."""
        up_is_1x1 = self.up.ndim < 3 or tuple(self.up.shape[2:]) == (1, 1)
        ranks_agree = self.up.shape[1] == self.down.shape[0]
        return up_is_1x1 and ranks_agree and self.up.shape[0] * self.down[0].numel() == math.prod(shape)


@dataclass(frozen=True, eq=False)
class LoraFile:
    name: str
    path: Path
    layers: dict[str, LoraLayer]
    metadata: dict[str, str]


def read_layers(tensors: dict[str, torch.Tensor], file_name: str) -> dict[str, LoraLayer]:
    """The kohya layers of a file's tensors; LoraError for other formats or incomplete layers."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if part not in PARTS:
            kind = next((what for marker, what in OTHER_FORMATS.items() if key.endswith(marker)), None)
            if kind:
                raise LoraError(f"{file_name} is a {kind} network ({key}); only kohya-ss LoRA (lora_down/lora_up) is supported")
            raise LoraError(f"{file_name}: {key!r} is not a kohya-ss LoRA weight (NAME.lora_down.weight, NAME.lora_up.weight, NAME.alpha)")
        parts.setdefault(name, {})[PARTS[part]] = tensor
    if not parts:
        raise LoraError(f"{file_name} holds no LoRA weights")
    layers = {}
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            raise LoraError(f"{file_name}: layer {name} lacks its {'lora_down' if 'down' not in found else 'lora_up'} weight")
        alpha = found.get("alpha")
        layers[name] = LoraLayer(found["down"], found["up"], float(alpha) if alpha is not None else None)
    return layers


def short_hash(lora: LoraFile, hash_cache: Path | None = None) -> str:
    """A1111's LoRA hash: kohya's own from the metadata, else that of the file (for .safetensors
    kohya's hash of the tensor data, else the sha256 of the whole file)."""
    stored = lora.metadata.get("sshs_model_hash")
    if stored:
        return stored[:SHORT_HASH]
    hash_of = loader.addnet_hash if lora.path.suffix.lower() == ".safetensors" else loader.full_hash
    return hash_of(lora.path, hash_cache)[:SHORT_HASH]


class LoraLibrary:
    """The LoRA files in one folder (and its subfolders), read on demand and kept while unchanged."""

    CACHED = 4  # files kept in memory

    def __init__(self, folder: Path, hash_cache: Path | None = None):
        self.folder = Path(folder)
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], LoraFile]] = {}

    def available(self) -> dict[str, Path]:
        """Name -> file: the file name without extension, and for files in subfolders also the
        relative path without extension."""
        if not self.folder.is_dir():
            return {}
        names = {}
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() in SUFFIXES and path.is_file():
                names.setdefault(path.stem, path)
                names.setdefault(path.relative_to(self.folder).with_suffix("").as_posix(), path)
        return names

    def load(self, name: str, path: Path) -> LoraFile:
        stat = path.stat()
        version = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
        try:
            tensors, metadata = loader.read_state_dict(path)
        except loader.CheckpointError as e:
            raise LoraError(f"LoRA {name!r}: {e}") from e
        lora = LoraFile(name, path, read_layers(tensors, path.name), metadata)
        with self._lock:
            self._cache[path] = (version, lora)
            while len(self._cache) > self.CACHED:
                del self._cache[next(iter(self._cache))]
        return lora

    def resolve(self, prompt: str) -> list[tuple[LoraFile, NetworkCall]]:
        """The LoRA calls of a (validated) prompt with their files. An unknown name is a
        LoraError naming it, where it stands, and what there is."""
        available = self.available()
        resolved = []
        for call in parse_extra_networks(prompt)[1]:
            path = available.get(call.name)
            if path is None:
                known = ", ".join(sorted({p.stem for p in available.values()})) or f"none: put .safetensors files in {self.folder}"
                raise LoraError(f"prompt: there is no LoRA named {call.name!r} (at character {call.position + 1}); available: {known}")
            resolved.append((self.load(call.name, path), call))
        return resolved

    def infotext_value(self, resolved: list[tuple[LoraFile, NetworkCall]]) -> str | None:
        """A1111's "Lora hashes" value: "name: hash, ..." by the names the prompt used."""
        hashes = {call.name.translate(_NO_SEPARATORS): short_hash(lora, self.hash_cache) for lora, call in resolved}
        return ", ".join(f"{name}: {value}" for name, value in hashes.items()) or None


_NO_SEPARATORS = str.maketrans("", "", ":,")


# ---- applying -----------------------------------------------------------------------------------


# A weight's share of a plan: the LoRA layer, its multiplier, and the rows it changes (None: all).
Change = tuple[LoraLayer, float, slice | None]


def _plan(sd_model, resolved: list[tuple[LoraFile, NetworkCall]]) -> dict[nn.Parameter, list[Change]]:
    """Weight -> the LoRA layers to add to it, with their multipliers and rows; every check
    happens here, before anything is changed."""
    targets = layer_targets(sd_model)
    family = sd_model.spec.family
    plan: dict[nn.Parameter, list[Change]] = {}
    for lora, call in resolved:
        unmatched = [name for name in lora.layers if name not in targets]
        if len(unmatched) == len(lora.layers):
            raise LoraError(f"LoRA {lora.name!r} matches no layer of this model ({family}); its layers are named like "
                            f"{unmatched[0]}: it may be made for another model family")
        if unmatched:
            log.warning("LoRA %s: %d of its %d layers are not in this model (%s) and are left out, e.g. %s",
                        lora.name, len(unmatched), len(lora.layers), family, unmatched[0])
        for name, layer in lora.layers.items():
            target = targets.get(name)
            if target is None:
                continue
            if not layer.fits(target.shape):
                raise LoraError(f"LoRA {lora.name!r} does not fit this model ({family}): layer {name} gives "
                                f"{list(layer.up.shape[:1]) + list(layer.down.shape[1:])}, the model's weight is "
                                f"{list(target.shape)}; it may be made for another model family")
            multiplier = call.te if target.text else call.unet
            if multiplier:
                plan.setdefault(target.weight, []).append((layer, multiplier, target.rows))
    return plan


def apply(sd_model, resolved: list[tuple[LoraFile, NetworkCall]]) -> Callable[[], None]:
    """Puts the LoRA-adapted weights in place and returns the function that puts the original
    tensors back (call it in a `finally`). Raises LoraError, with nothing changed, when a LoRA
    does not fit the model."""
    plan = _plan(sd_model, resolved)
    originals: dict[nn.Parameter, torch.Tensor] = {}

    def restore() -> None:
        for weight, original in originals.items():
            weight.data = original

    try:
        with torch.no_grad():
            for weight, changes in plan.items():
                original = weight.data
                # A copy even when W is float32 already: the deltas are added in place, row blocks
                # at a time, and W itself must stay untouched.
                total = original.to(torch.float32, copy=True)
                for layer, multiplier, rows in changes:
                    part = total if rows is None else total[rows]
                    part += multiplier * layer.delta(part.shape, original.device)
                originals[weight] = original
                weight.data = total.to(original.dtype)
    except BaseException:
        restore()
        raise
    return restore
