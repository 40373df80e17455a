"""Checkpoint files -> state dicts -> SDModel, and the model hash A1111 shows.

A `.yaml` file beside a checkpoint with the same name is its config, as in A1111 (an ldm or sgm
config, read with omegaconf); modules.models.detect takes from it what the weights cannot show.

`.safetensors` files are memory-mapped; `.ckpt` files (pickles) are read by torch's weights-only
unpickler, which builds tensors and plain containers and refuses every other object, so a
malicious file runs nothing. The tensors are assigned into a model built on the meta device:
nothing is initialised or copied that the file already holds.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modules.app.fileio import atomic_write_json
from modules.models import detect
from modules.models import safetensors_stream as st
from modules.models.sd_model import SDModel, build_model, scaled_linear_alphas_cumprod

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
# Keys some files carry beside the networks: training leftovers that no network uses.
IGNORED_PREFIXES = ("model_ema.", "loss.", "model_ema_")
HASH_CHUNK = 1 << 20
# How torch's weights-only unpickler names the object it refused to build (its wording varies).
REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message names the file and says why."""


class _LightningCheckpointCallback:
    """Stands in for the trainer callback object that PyTorch Lightning pickles into many SD 1.x
    `.ckpt` files: it holds only bookkeeping, is never used, and must not be imported or run."""

    def __setstate__(self, state):
        pass


# The only non-container globals a checkpoint's pickle may name, beyond torch's own tensor types.
EXTRA_PICKLE_GLOBALS = [
    (_LightningCheckpointCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by key, file metadata) of a checkpoint file, unwrapped from `state_dict` nesting."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle(path), {}
    else:
        raise CheckpointError(f"{path.name}: unknown file type {suffix!r}; use .safetensors or .ckpt")
    return tensors, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # Each tensor's pages of the file are given back when it is freed, so casting the loaded
    # model sheds the file tensor by tensor: the peak is the cast model, not it plus the file.
    # The safetensors package, whose mapping stays whole, where that cannot be done (Windows).
    try:
        if st.MAPPABLE:
            with st.Reader(path) as reader:
                return {k: reader.map(k) for k in reader.entries}, reader.metadata
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as e:  # st.FormatError is a ValueError
        raise CheckpointError(f"{path.name}: not a readable .safetensors file ({e})") from e


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    return _unwrap(read_pickle(path), path)


def read_pickle(path: Path, extra_globals: Sequence = ()) -> object:
    """What a pickled file (.ckpt, .pt, .bin) holds, built by torch's weights-only unpickler: tensors
    and plain containers, plus the harmless stand-ins of EXTRA_PICKLE_GLOBALS and `extra_globals`.
    Raises CheckpointError naming the file, and the refused object when there is one."""
    try:
        with torch.serialization.safe_globals([*EXTRA_PICKLE_GLOBALS, *extra_globals]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files written by torch before 1.6 are not zip archives and cannot be mapped.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = REFUSED_GLOBAL.search(str(e))
        if refused is None:
            raise CheckpointError(f"{path.name}: not a readable checkpoint (the pickle data is damaged)") from e
        raise CheckpointError(
            f"{path.name} was refused: it names {refused.group(1)}, which is not a tensor or a plain container, "
            f"and such a pickle could run code when loaded. Nothing in it was "
            f"run. Use a .safetensors copy of this model, or convert the file with a tool you trust."
        ) from e
    except Exception as e:  # torch.load reports broken data with many exception types
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def _unwrap(data, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint: Lightning and others nest them under `state_dict`."""
    while isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path.name}: holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _ema_key(key: str) -> str:
    """Where ldm's EMA copy keeps a `model.`-prefixed weight: `model_ema.` + the rest without dots."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def network_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint. A file whose UNet exists only as its EMA copy (some
    training checkpoints) has the EMA weights put back under the original keys."""
    if not any(k.startswith(detect.UNET) for k in tensors) and any(k.startswith(EMA_PREFIX) for k in tensors):
        tensors = {**tensors, **_unet_from_ema(tensors)}
    return {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}


def _unet_from_ema(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The dotless EMA names are ambiguous on their own; SD 1.5's key list disambiguates them.
    reference = build_model(detect.sd15_spec(), device="meta").state_dict()
    restored = {}
    for key in reference:
        if key.startswith(detect.UNET) and _ema_key(key) in tensors:
            restored[key] = tensors[_ema_key(key)]
    return restored


def vae_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A standalone VAE file's weights under `first_stage_model.`, as a checkpoint holds them."""
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix(detect.VAE)
        if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[detect.VAE + key] = value
    if not out:
        raise CheckpointError("no VAE weights (encoder.*, decoder.*) in this file")
    return out


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Buffers that files do not carry (CLIP's position ids) are still on the meta device after
    loading; they are rebuilt here from their shape."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(f"the model's buffer {name!r} is not in the file and cannot be rebuilt")
            module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(), persistent=False)


def config_path(path: Path) -> Path:
    """Where a checkpoint's config is: NAME.yaml beside NAME.safetensors (or .ckpt)."""
    return Path(path).with_suffix(".yaml")


def read_config(path: Path) -> dict | None:
    """The `.yaml` config beside a checkpoint as plain data, or None when there is none."""
    config = config_path(path)
    if not config.is_file():
        return None
    from omegaconf import OmegaConf  # only for checkpoints that have a config beside them

    try:
        data = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    except Exception as e:  # omegaconf and yaml report bad files with many exception types
        raise CheckpointError(f"{config.name}: not a readable config ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{config.name}: holds a {type(data).__name__}, not an ldm or sgm config")
    return data


def build_from_state_dict(weights: dict[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                          config: Mapping | None = None) -> SDModel:
    """An SDModel holding `weights` (assigned, not copied), built after the spec they (and the
    file's metadata and config) imply."""
    spec = detect.detect({k: tuple(v.shape) for k, v in weights.items()}, metadata, config)
    model = build_model(spec, device="meta", alphas_cumprod=scaled_linear_alphas_cumprod())
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the {spec.family} checkpoint lacks {len(missing)} weights: {shown}; the file may be damaged")
    # Extra keys (e.g. a stray buffer of a newer training script) are harmless and ignored.
    _materialize_buffers(model)
    return model.eval().requires_grad_(False)


def read_spec(path: Path) -> detect.ModelSpec | None:
    """What a .safetensors checkpoint's header (and its .yaml) imply, without reading a weight;
    None for a pickled file, whose keys cannot be listed without reading it, or one that fails
    detection (loading it names the problem)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    try:
        with st.Reader(path) as reader:
            shapes = {key: entry.shape for key, entry in network_weights(reader.entries).items()}
            metadata = reader.metadata
        return detect.detect(shapes, metadata, read_config(path))
    except (OSError, ValueError):  # CheckpointError, DetectionError and st.FormatError are ValueErrors
        return None


def load_checkpoint(path: Path, vae_path: Path | None = None) -> SDModel:
    """The SDModel of a checkpoint file, with the VAE replaced by `vae_path`'s when given.
    Raises CheckpointError (or detect.DetectionError) naming the file on any problem."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    config = read_config(path)
    weights = network_weights(tensors)
    if vae_path is not None:
        vae_tensors, _ = read_state_dict(Path(vae_path))
        try:
            weights.update(vae_weights(vae_tensors))
        except CheckpointError as e:
            raise CheckpointError(f"{Path(vae_path).name}: {e}") from e
    try:
        model = build_from_state_dict(weights, metadata, config)
    except (detect.DetectionError, CheckpointError) as e:
        raise type(e)(f"{path.name}: {e}") from e
    except RuntimeError as e:  # shape mismatches reported by load_state_dict
        raise CheckpointError(f"{path.name}: the weights do not fit the detected model ({str(e).splitlines()[-1].strip()})") from e
    return model


# ---- hashes -------------------------------------------------------------------------------------

_hash_lock = threading.Lock()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_hash(path: Path, cache_file: Path | None = None) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256, computed once per file
    version (path, size and modification time) and kept in `cache_file`."""
    return full_hash(path, cache_file)[:10]


def full_hash(path: Path, cache_file: Path | None = None) -> str:
    return _cached_hash(path, cache_file, "sha256", sha256_of)


def addnet_hash(path: Path, cache_file: Path | None = None) -> str:
    """kohya-ss's hash of a .safetensors file, which A1111 shows for LoRAs: the sha256 of the
    tensor data after the JSON header, so that editing the metadata keeps the hash."""
    return _cached_hash(path, cache_file, "addnet", _sha256_after_header)


def _sha256_after_header(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cached_hash(path: Path, cache_file: Path | None, kind: str, compute) -> str:
    """`compute(path)`, done once per file version (path, size and modification time) and kept
    in `cache_file` under `kind`."""
    path = Path(path).resolve()
    stat = path.stat()
    version = f"{stat.st_size}:{stat.st_mtime_ns}"
    with _hash_lock:
        cache = _read_cache(cache_file)
        entry = cache.get(str(path))
        if not isinstance(entry, dict) or entry.get("version") != version:
            entry = {"version": version}
        if isinstance(entry.get(kind), str):
            return entry[kind]
        entry[kind] = digest = compute(path)
        if cache_file is not None:
            cache[str(path)] = entry
            atomic_write_json(cache_file, cache)
        return digest


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None:
        return {}
    try:
        data = json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
