"""Textual-inversion embeddings from the `embeddings/` folder, read the way A1111 reads them.

A file's name without its extension is the word that calls it: with `embeddings/easyneg.pt`, the
word `easyneg` in a prompt is replaced by that file's n vectors, which take n token positions of
the 75 in a chunk (see modules.conditioning). Three layouts are read, listed in `LAYOUTS`:

    A1111 / textual inversion .pt   {"string_to_param": {"*": Tensor[n, dim]}, "step": ..., ...}
    .safetensors                     {"emb_params": Tensor[n, dim]}
    SDXL .safetensors                {"clip_l": Tensor[n, 768], "clip_g": Tensor[n, 1280]}
    diffusers .bin                   {"<token>": Tensor[dim]}

Pickled files (.pt, .bin) go through torch's weights-only unpickler (modules.models.loader), so a
file cannot run code. The folder is looked at again on every use and files are re-read when they
are added, removed or changed (by size and modification time), so new files work without a
restart. A file that cannot be used is logged and listed in `problems`, never raised: one broken
download must not stop every generation. Embeddings whose width does not match the model's text
encoder are `skipped` (a SD 2 embedding with a SD 1 model), as A1111 reports them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.models import loader
from modules.prompting.conditioning import CHUNK_TOKENS
from modules.prompting.tokenizer import tokenize

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
SHORT_HASH = 12  # A1111's "TI hashes" show this many hex digits of the file's sha256
# Old textual-inversion files keep their vectors in an nn.ParameterDict; unpickling one only
# fills in its attributes, so it is safe to allow beside tensors and containers.
PICKLE_GLOBALS = (torch.nn.ParameterDict,)


class EmbeddingError(ValueError):
    """A file that is not a usable embedding; the message says why."""


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, width], float32, on the CPU (SDXL: clip_l's and clip_g's side by side)
    path: Path
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORT_HASH]


# ---- reading one file ---------------------------------------------------------------------------


def _only_tensor(tensors: Mapping, what: str) -> torch.Tensor:
    values = list(tensors.values())
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        keys = ", ".join(map(str, list(tensors)[:5]))
        raise EmbeddingError(f"{what} holds {len(values)} entries ({keys}); an embedding file holds one tensor")
    return values[0]


def _a1111_vectors(data: Mapping) -> torch.Tensor:
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # an nn.ParameterDict in older files
    if not isinstance(params, Mapping):
        raise EmbeddingError(f"its string_to_param is a {type(params).__name__}, not a dictionary")
    return _only_tensor(params, "string_to_param")


def _sdxl_vectors(data: Mapping) -> torch.Tensor:
    """An SDXL embedding's two sets of vectors side by side, in the order of SDXL's encoders
    (CLIP ViT-L, then bigG), as SDModel.encode_text splits them."""
    clip_l, clip_g = data["clip_l"], data["clip_g"]
    if not (isinstance(clip_l, torch.Tensor) and isinstance(clip_g, torch.Tensor)) or clip_l.ndim != 2 or clip_g.ndim != 2:
        raise EmbeddingError("its clip_l and clip_g entries are not [n, width] tensors")
    if clip_l.shape[0] != clip_g.shape[0]:
        raise EmbeddingError(f"it has {clip_l.shape[0]} clip_l vectors but {clip_g.shape[0]} clip_g vectors")
    return torch.cat([clip_l.float(), clip_g.float()], dim=1)


# (layout, recognises the loaded data, gives its vectors); the first that recognises it is used.
LAYOUTS: list[tuple[str, Callable[[Mapping], bool], Callable[[Mapping], torch.Tensor]]] = [
    ("A1111 textual inversion", lambda d: "string_to_param" in d, _a1111_vectors),
    ("SDXL", lambda d: "clip_l" in d and "clip_g" in d, _sdxl_vectors),
    ("one tensor (safetensors emb_params, diffusers)", lambda d: all(isinstance(v, torch.Tensor) for v in d.values()),
     lambda d: _only_tensor(d, "the file")),
]


def _vectors(data: object) -> torch.Tensor:
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"it holds a {type(data).__name__}, not a dictionary")
    for _layout, matches, vectors_of in LAYOUTS:
        if matches(data):
            vectors = vectors_of(data)
            break
    else:
        keys = ", ".join(map(str, list(data)[:5]))
        raise EmbeddingError(f"it is not a textual-inversion embedding (its keys: {keys})")
    if vectors.ndim == 1:  # diffusers files hold one vector without the count dimension
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.is_floating_point() or vectors.numel() == 0:
        raise EmbeddingError(f"its vectors have shape {list(vectors.shape)} and type {vectors.dtype}; expected [n, width] floats")
    if not 1 <= vectors.shape[0] <= CHUNK_TOKENS:
        raise EmbeddingError(f"it has {vectors.shape[0]} vectors; a prompt chunk holds at most {CHUNK_TOKENS}")
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(vectors).all()):
        raise EmbeddingError("its vectors hold NaN or infinite values")
    return vectors


def _info(data: Mapping) -> dict[str, object]:
    """The training facts A1111 keeps beside the vectors, where present and of the right type."""
    kinds = {"step": int, "sd_checkpoint": str, "sd_checkpoint_name": str}
    return {key: data[key] for key, kind in kinds.items() if isinstance(data.get(key), kind)}


def read_embedding(path: Path, hash_cache: Path | None = None) -> Embedding:
    """The embedding in one file; raises EmbeddingError (a ValueError) saying why it is not one."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            data, metadata = loader.read_state_dict(path)
            # The training facts are text in the file's metadata, the step among them.
            facts = {**metadata, "step": int(metadata["step"])} if metadata.get("step", "").isdigit() else metadata
        else:
            data = facts = loader.read_pickle(path, PICKLE_GLOBALS)
    except loader.CheckpointError as e:
        raise EmbeddingError(str(e).removeprefix(f"{path.name}: ")) from e
    vectors = _vectors(data)
    return Embedding(path.stem, vectors, path, loader.full_hash(path, hash_cache), **_info(facts))


# ---- the token table that conditioning uses ------------------------------------------------------


class EmbeddingTable:
    """Finds embedding names in a prompt's tokens. Names are tokenized like prompt text, so the
    tokenizer's lower-casing applies: `EasyNeg.pt` is called by `easyneg` too."""

    def __init__(self, embeddings: Iterable[Embedding]):
        embeddings = list(embeddings)
        self._by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding, ids in zip(embeddings, tokenize([e.name for e in embeddings])):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), embedding))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))  # the longest name wins

    def match(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """(embedding, number of name tokens) when an embedding's name starts at `position`."""
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return embedding, len(ids)
        return None


# ---- the folder ---------------------------------------------------------------------------------


class EmbeddingDatabase:
    """The embeddings in one folder (and its subfolders), kept in step with the files."""

    def __init__(self, folder: Path, hash_cache: Path | None = None):
        self.folder = Path(folder)
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}  # path -> (version, result)
        self._embeddings: dict[str, Embedding] = {}
        self._problems: dict[str, str] = {}
        self._tables: dict[int, EmbeddingTable] = {}

    def _scan(self) -> dict[Path, tuple[int, int]]:
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.rglob("*"):
            if path.suffix.lower() in SUFFIXES:
                try:
                    stat = path.stat()
                except OSError:  # removed while we looked
                    continue
                if path.is_file():
                    found[path] = (stat.st_size, stat.st_mtime_ns)
        return found

    def refresh(self) -> None:
        """Re-reads what changed in the folder since the last look; cheap when nothing did."""
        with self._lock:
            found = self._scan()
            if found.keys() == self._files.keys() and all(self._files[p][0] == v for p, v in found.items()):
                return
            files = {}
            for path, version in sorted(found.items()):
                known = self._files.get(path)
                if known is not None and known[0] == version:
                    files[path] = known
                    continue
                try:
                    files[path] = (version, read_embedding(path, self.hash_cache))
                except (EmbeddingError, OSError) as e:
                    log.warning("embedding %s not loaded: %s", path.name, e)
                    files[path] = (version, str(e))
            self._files = files
            self._index()

    def _index(self) -> None:
        embeddings: dict[str, Embedding] = {}
        problems: dict[str, str] = {}
        by_lower: dict[str, Embedding] = {}
        for path, (_version, result) in self._files.items():
            shown = path.relative_to(self.folder).as_posix()
            if isinstance(result, str):
                problems[shown] = result
            elif result.name.lower() in by_lower:
                other = by_lower[result.name.lower()].path.relative_to(self.folder).as_posix()
                problems[shown] = f"has the same name as {other}, which is used instead; rename one of them"
            else:
                by_lower[result.name.lower()] = embeddings[result.name] = result
        self._embeddings, self._problems, self._tables = embeddings, problems, {}

    def embeddings(self) -> dict[str, Embedding]:
        """Every readable embedding by name, whatever its width."""
        self.refresh()
        return dict(self._embeddings)

    def problems(self) -> dict[str, str]:
        """File (relative to the folder) -> why it is not used."""
        self.refresh()
        return dict(self._problems)

    def split(self, width: int | None) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped): the embeddings that fit a text encoder of `width` and those that do
        not; with no width (no model loaded) all count as loaded."""
        loaded, skipped = {}, {}
        for name, embedding in self.embeddings().items():
            (loaded if width is None or embedding.width == width else skipped)[name] = embedding
        return loaded, skipped

    def table(self, width: int) -> EmbeddingTable:
        """The table of the embeddings that fit a text encoder of `width`."""
        loaded, skipped = self.split(width)
        with self._lock:
            if width not in self._tables:  # once per model width and folder state
                for embedding in skipped.values():
                    log.warning("embedding %s skipped: %s", embedding.name, skipped_reason(embedding, width))
                self._tables[width] = EmbeddingTable(loaded.values())
            return self._tables[width]


def skipped_reason(embedding: Embedding, width: int) -> str:
    return f"its vectors are {embedding.width} wide and the loaded model's text encoder takes {width}"


def infotext_value(used: Iterable[Embedding]) -> str | None:
    """A1111's "TI hashes" value: "name: hash, name: hash" (":" and "," left out of names)."""
    parts = [f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in used]
    return ", ".join(parts) or None
