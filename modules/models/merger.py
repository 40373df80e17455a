"""Checkpoint merger: models A, B, C and a multiplier M into a new checkpoint, as A1111 merges.

    No interpolation   A (to convert it, halve it or bake a VAE into it)
    Weighted sum       (1 - M)·A + M·B
    Add difference     A + M·(B - C)

The work is split in two. `plan` decides, from the keys, shapes and dtypes of the inputs alone,
what every output tensor is and where it comes from; it is pure and raises MergeError for
inputs that do not fit together. `merge` then streams: each output tensor is computed from one
tensor of each input and written before the next is read, so memory holds a few tensors, not
three models (inputs and output are .safetensors; a .ckpt input is memory-mapped, a .ckpt
output is collected in memory because torch.save writes one object).

Keys present in one model only follow A1111: a key only A has keeps A's tensor; a key only B
has is copied from B; under "Add difference" a key that C lacks keeps A's tensor. Only keys
with "model" in their name are merged (A1111's rule; the networks' weights all have it). An
inpainting (9-channel) or instruct-pix2pix (8-channel) A merged with a normal B merges the
input convolution's first 4 channels and keeps A's others; the other way round is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.app import fileio
from modules.images.storage import ILLEGAL_CHARACTERS
from modules.models import detect, loader
from modules.models import safetensors_stream as st
from modules.service.jobs import Job

FORMATS = ("safetensors", "ckpt")
# Never merged, as in A1111: an integer index, the same in every file that has it.
SKIP_ON_MERGE = {"cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
# File metadata that says how to run the model (see modules/models/detect.py); the result keeps A's.
CARRIED_METADATA = ("resolution", "prediction", "scale_factor")
LATENT_CHANNELS = 4
MAX_NAME_BYTES = 200


class MergeError(ValueError):
    """Models or settings that cannot be merged; the message says which and why."""


class MergeStopped(Exception):
    """The user interrupted the merge; nothing was written."""


# ---- the math --------------------------------------------------------------------------------------


def weighted_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, m: float) -> torch.Tensor:
    """(1 - m)·a + m·b, in float32."""
    return a.to(torch.float32, copy=True).mul_(1.0 - m).add_(b, alpha=m)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, m: float) -> torch.Tensor:
    """a + m·(b - c), in float32."""
    return b.to(torch.float32, copy=True).sub_(c).mul_(m).add_(a)


@dataclass(frozen=True)
class Interpolation:
    name: str
    models: int  # how many of A, B, C it reads
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor] | None
    describe: Callable[[str, str, str, float], str]  # the default output name, as A1111 makes it


INTERPOLATIONS: tuple[Interpolation, ...] = (
    Interpolation("No interpolation", 1, None, lambda a, b, c, m: a),
    Interpolation("Weighted sum", 2, weighted_sum, lambda a, b, c, m: f"{round(1 - m, 2)}({a}) + {round(m, 2)}({b})"),
    Interpolation("Add difference", 3, add_difference, lambda a, b, c, m: f"{a} + {round(m, 2)}({b} - {c})"),
)


def find_interpolation(name: str) -> Interpolation:
    for method in INTERPOLATIONS:
        if method.name == name:
            return method
    raise MergeError(f"no interpolation method {name!r}; choose one of {', '.join(m.name for m in INTERPOLATIONS)}")


# ---- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """What the plan needs to know of a tensor: no data."""

    dtype: torch.dtype
    shape: tuple[int, ...]


Infos = Mapping[str, Info]


@dataclass(frozen=True)
class Step:
    """How one output tensor is made. source: "A", "B", "VAE" (copied, cast to dtype) or
    "merge" (combined from A, B and C; `channels` set when only the first channels of A are)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str
    channels: int | None = None


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    inpainting: bool = False
    instruct_pix2pix: bool = False


def _out_dtype(dtype: torch.dtype, half: bool) -> torch.dtype:
    # A1111 halves float32 only; other dtypes (already fp16, bf16, integers) are kept.
    return torch.float16 if half and dtype == torch.float32 else dtype


def _merged(key: str, a: Info, b: Info, c: Info | None) -> int | None:
    """None when A and B (and C) have one shape; the number of A's input channels merged when
    A is an inpainting or instruct-pix2pix model and B a normal one; MergeError otherwise."""
    if c is not None and c.shape != b.shape:
        raise MergeError(f"{key}: B is {list(b.shape)} but C is {list(c.shape)}; B and C must be the same kind of model")
    if a.shape == b.shape:
        return None
    same_but_channels = len(a.shape) == len(b.shape) == 4 and a.shape[:1] + a.shape[2:] == b.shape[:1] + b.shape[2:]
    if same_but_channels and b.shape[1] == LATENT_CHANNELS and a.shape[1] in (8, 9):
        return LATENT_CHANNELS
    if same_but_channels and a.shape[1] == LATENT_CHANNELS and b.shape[1] in (8, 9):
        kind = "an inpainting" if b.shape[1] == 9 else "an instruct-pix2pix"
        raise MergeError(f"B is {kind} model and A is not: when merging such a model with a normal one, A must be the {kind.split()[1]} model")
    raise MergeError(f"{key} is {list(a.shape)} in A but {list(b.shape)} in B: the models are of different kinds and cannot be merged")


def _family(infos: Infos) -> str | None:
    """The model family the tensors are (inpainting or not), or None when detection cannot tell."""
    try:
        return detect.detect({k: i.shape for k, i in infos.items()}).family.removesuffix(" inpainting")
    except detect.DetectionError:
        return None


def check_families(a: Infos, b: Infos | None, c: Infos | None) -> None:
    """MergeError naming both families when B or C is of another family than A."""
    family_a = _family(a)
    for letter, other in (("B", b), ("C", c)):
        family = _family(other) if other is not None else None
        if family_a and family and family != family_a:
            raise MergeError(f"A is an {family_a} model and {letter} an {family} model: only models of one family can be merged")


def plan(method: Interpolation, a: Infos, b: Infos | None = None, c: Infos | None = None, *, half: bool = False,
         vae: Infos | None = None, discard: str = "") -> Plan:
    """The output of merging models with these tensors; pure."""
    try:
        discarded = re.compile(discard) if discard else None
    except re.error as e:
        raise MergeError(f"discard weights: {discard!r} is not a regular expression ({e})") from e
    b = b if method.models >= 2 else None
    c = c if method.models >= 3 else None
    check_families(a, b, c)
    steps: list[Step] = []
    inpainting = pix2pix = False
    for key, info in a.items():
        mergeable = (b is not None and key in b and "model" in key and key not in SKIP_ON_MERGE
                     and info.dtype.is_floating_point and (c is None or key in c))
        if not mergeable:
            steps.append(Step(key, _out_dtype(info.dtype, half), info.shape, "A"))
            continue
        channels = _merged(key, info, b[key], c[key] if c is not None else None)
        if channels is not None:
            inpainting = inpainting or info.shape[1] == 9
            pix2pix = pix2pix or info.shape[1] == 8
        steps.append(Step(key, _out_dtype(info.dtype, half), info.shape, "merge", channels))
    if b is not None:
        steps += [Step(k, _out_dtype(v.dtype, half), v.shape, "B") for k, v in b.items() if k not in a and "model" in k]
    if vae:
        by_key = {s.key: i for i, s in enumerate(steps)}
        for key, info in vae.items():
            if key not in by_key:
                continue
            if steps[by_key[key]].shape != info.shape:
                raise MergeError(f"the VAE's {key} is {list(info.shape)} but the model's is {list(steps[by_key[key]].shape)}: this VAE does not fit the model")
            steps[by_key[key]] = Step(key, _out_dtype(info.dtype, half), info.shape, "VAE")
    if discarded is not None:
        steps = [s for s in steps if not discarded.search(s.key)]
    return Plan(steps, inpainting, pix2pix)


# ---- reading the inputs ------------------------------------------------------------------------------


class Source:
    """One input file, read tensor by tensor: .safetensors through its own reader, anything else
    through the checkpoint loader (memory-mapped, weights-only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix.lower() in loader.SAFETENSORS_SUFFIXES:
            try:
                self._reader = st.Reader(self.path)
            except (st.FormatError, OSError) as e:
                raise MergeError(str(e)) from e
            self.infos = {k: Info(e.dtype, e.shape) for k, e in self._reader.entries.items()}
            self.metadata = self._reader.metadata
            self._tensors = None
        else:
            self._reader = None
            try:
                self._tensors, self.metadata = loader.read_state_dict(self.path)
            except loader.CheckpointError as e:
                raise MergeError(str(e)) from e
            self.infos = {k: Info(t.dtype, tuple(t.shape)) for k, t in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        if self._reader is not None:
            try:
                return self._reader.get(key)
            except (st.FormatError, OSError) as e:
                raise MergeError(str(e)) from e
        return self._tensors[key]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._tensors = None


# ---- the request and the merge -----------------------------------------------------------------------


@dataclass(frozen=True)
class MergeRequest:
    primary: str  # checkpoint names as ModelManager.find_checkpoint takes them
    secondary: str | None = None
    tertiary: str | None = None
    interpolation: str = "Weighted sum"
    multiplier: float = 0.3
    name: str = ""  # the output's name without extension; empty: made from the inputs, as A1111 does
    checkpoint_format: str = "safetensors"
    save_as_half: bool = False
    bake_in_vae: str = "None"  # a file in models/VAE, or "None"
    discard_weights: str = ""  # a regular expression; matching keys are left out


def validate_name(name: str) -> str:
    """The output name with surrounding spaces and a typed extension removed; MergeError if it
    cannot be a file name in the checkpoint folder."""
    name = name.strip()
    for fmt in FORMATS:
        name = name.removesuffix(f".{fmt}")
    if not name:
        raise MergeError("the output name is empty")
    if ILLEGAL_CHARACTERS.search(name) or name.startswith(".") or name.endswith((" ", ".")):
        raise MergeError(
            f"the output name {name!r} cannot be a file name: leave out / \\ : * ? \" < > | # and control "
            f"characters, and do not start it with a dot or end it with a dot or a space"
        )
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise MergeError(f"the output name is {len(name.encode('utf-8'))} bytes long; at most {MAX_NAME_BYTES} fit in a file name")
    return name


def legacy_hash(path: Path) -> str:
    """A1111's old 8-digit model hash: sha256 of 64 KiB read at 1 MiB into the file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _recipe(request: MergeRequest, result: Plan, infos: list, hashes: dict[Path, str], metadata: list[dict]) -> dict[str, str]:
    """A1111's sd_merge_recipe and sd_merge_models metadata."""
    recipe = {
        "type": "webui",
        "primary_model_hash": hashes[infos[0].path],
        "secondary_model_hash": hashes[infos[1].path] if len(infos) > 1 else None,
        "tertiary_model_hash": hashes[infos[2].path] if len(infos) > 2 else None,
        "interp_method": request.interpolation,
        "multiplier": request.multiplier,
        "save_as_half": request.save_as_half,
        "custom_name": request.name,
        "config_source": 0,
        "bake_in_vae": request.bake_in_vae,
        "discard_weights": request.discard_weights,
        "is_inpainting": result.inpainting,
        "is_instruct_pix2pix": result.instruct_pix2pix,
    }
    models: dict[str, object] = {}
    for info, meta in zip(infos, metadata):
        models[hashes[info.path]] = {
            "name": info.name,
            "legacy_hash": legacy_hash(info.path),
            "sd_merge_recipe": json.loads(meta["sd_merge_recipe"]) if _json(meta.get("sd_merge_recipe")) else None,
        }
        if _json(meta.get("sd_merge_models")):
            models.update(json.loads(meta["sd_merge_models"]))
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def _json(text: str | None) -> bool:
    try:
        return isinstance(json.loads(text), dict) if text else False
    except ValueError:
        return False


def merge(ctx, request: MergeRequest, job: Job | None = None) -> Path:
    """Merges as `request` says and writes the result to models/Stable-diffusion atomically;
    returns its path. MergeError (or LookupError for an unknown model) says what was wrong."""
    job = job or Job()
    method = find_interpolation(request.interpolation)
    if request.checkpoint_format not in FORMATS:
        raise MergeError(f"checkpoint format must be one of {', '.join(FORMATS)}, got {request.checkpoint_format!r}")
    if isinstance(request.multiplier, bool) or not isinstance(request.multiplier, (int, float)) or not math.isfinite(request.multiplier):
        raise MergeError(f"multiplier must be a number, got {request.multiplier!r}")
    wanted = [request.primary, request.secondary, request.tertiary][: method.models]
    for letter, name in zip("ABC", wanted):
        if not name:
            raise MergeError(f"{request.interpolation} needs model {letter}")
    infos = [ctx.models.find_checkpoint(name) for name in wanted]
    vae_path = ctx.models.vae_for(infos[0], request.bake_in_vae) if request.bake_in_vae not in ("None", "") else None
    name = validate_name(request.name or method.describe(*[i.name for i in infos], *[""] * (3 - len(infos)), request.multiplier))

    job.status = "Reading the models"
    sources: list[Source] = []
    try:
        for info in infos:
            sources.append(Source(info.path))
        vae = None
        if vae_path is not None:
            tensors, _ = loader.read_state_dict(vae_path)
            vae = loader.vae_weights(tensors)
        infos_of = [s.infos for s in sources]
        result = plan(method, *infos_of, half=request.save_as_half,
                      vae={k: Info(v.dtype, tuple(v.shape)) for k, v in vae.items()} if vae else None,
                      discard=request.discard_weights)
        if not result.steps:
            raise MergeError("nothing to write: the discard expression leaves out every weight")
        suffix = ".inpainting" if result.inpainting else ""
        path = ctx.paths.checkpoints / f"{name}{suffix}.{request.checkpoint_format}"
        if path.exists():
            raise MergeError(f"{path.name} already exists in {ctx.paths.checkpoints}; choose another name")

        job.status = "Hashing the models"
        hashes = {i.path: loader.full_hash(i.path, ctx.paths.hash_cache) for i in infos}
        metadata = {k: v for k, v in sources[0].metadata.items() if k in CARRIED_METADATA}
        metadata.update(_recipe(request, result, infos, hashes, [s.metadata for s in sources]))

        job.status = f"Merging into {path.name}"
        job.total_steps = len(result.steps)

        def produce(step: Step) -> torch.Tensor:
            if job.interrupted:
                raise MergeStopped()
            tensor = _compute(step, sources, vae, method, float(request.multiplier))
            job.step += 1
            return tensor

        if request.checkpoint_format == "safetensors":
            entries = st.plan((s.key, s.dtype, s.shape) for s in result.steps)
            steps = {s.key: s for s in result.steps}
            fileio.atomic_write(path, lambda f: st.write(f, entries, lambda e: produce(steps[e.key]), metadata))
        else:
            tensors = {s.key: produce(s) for s in result.steps}
            fileio.atomic_write(path, lambda f: torch.save(tensors, f))
    finally:
        for source in sources:
            source.close()
    return path


def _compute(step: Step, sources: list[Source], vae: Mapping[str, torch.Tensor] | None, method: Interpolation,
             multiplier: float) -> torch.Tensor:
    if step.source == "A":
        return sources[0].get(step.key).to(step.dtype)
    if step.source == "B":
        return sources[1].get(step.key).to(step.dtype)
    if step.source == "VAE":
        return vae[step.key].to(step.dtype)
    a, b = sources[0].get(step.key), sources[1].get(step.key)
    c = sources[2].get(step.key) if len(sources) > 2 else None
    if step.channels is None:
        return method.combine(a, b, c, multiplier).to(step.dtype)
    n = step.channels
    out = a.to(torch.float32, copy=True)
    out[:, :n] = method.combine(a[:, :n], b, c, multiplier)
    return out.to(step.dtype)
