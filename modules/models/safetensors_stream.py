"""The .safetensors format read and written one tensor at a time.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes, little-endian u64 N;
N bytes of JSON mapping each tensor's name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets into the data that follows) plus an optional "__metadata__" of strings; then the data,
each tensor's bytes little-endian and C-contiguous, with no gaps.

The safetensors package reads by memory-mapping the whole file, so every tensor read stays
resident until the last of them is freed, and it writes from a dict that holds every tensor at
once. Here a tensor is either read into its own buffer (`Reader.get`) or mapped
(`Reader.map`), and either way its memory is given back when it is dropped; a file is written
from a header planned up front and then one tensor at a time.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy
import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
METADATA = "__metadata__"
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors package refuses larger headers too
_ALIGNMENT = 8  # the header is padded with spaces so the data starts 8-byte aligned, as the package writes it

if sys.byteorder != "little":  # tensors are written and read as raw little-endian bytes
    raise ImportError("modules.models.safetensors_stream needs a little-endian machine")


def _libc_mapping():
    """libc's mmap, munmap and madvise, or None where they cannot be called this way (Windows,
    32-bit builds whose off_t may be narrower). Python's mmap module cannot give back part of a
    mapping, which is what lets a model cast tensor by tensor shed the file as it goes."""
    if os.name != "posix" or sys.maxsize <= 2**32 or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        map_, unmap, advise = libc.mmap, libc.munmap, libc.madvise
    except (OSError, AttributeError):
        return None
    map_.restype = ctypes.c_void_p
    map_.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    unmap.restype = advise.restype = ctypes.c_int
    unmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    advise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return map_, unmap, advise


_LIBC = _libc_mapping()
MAPPABLE = _LIBC is not None  # whether Reader.map works here
_MAP_FAILED = ctypes.c_void_p(-1).value


class _FileMapping:
    """A private (copy-on-write) mapping of a whole file, unmapped when the last _Part of it is
    freed. One mapping rather than one per tensor: the kernel places it so that the page cache's
    large folios can be mapped whole, which makes reading it faster."""

    # The libc calls are kept here so that parts freed at interpreter exit, when this module's
    # globals may already be gone, still find them.
    __slots__ = ("address", "length", "_unmap", "_advise")
    _PAGE = mmap.PAGESIZE
    _DONTNEED = getattr(mmap, "MADV_DONTNEED", 0)

    def __init__(self, fd: int, length: int):
        self.address = None
        map_, self._unmap, self._advise = _LIBC
        address = map_(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if address in (None, _MAP_FAILED):
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        self.address, self.length = address, length

    def release(self, address: int, length: int) -> None:
        """Drops the pages lying wholly inside [address, address + length) from the process;
        touching them again would read them from the file anew."""
        first = -(-address // self._PAGE) * self._PAGE
        last = (address + length) // self._PAGE * self._PAGE
        if last > first:
            self._advise(first, last - first, self._DONTNEED)

    def __del__(self) -> None:
        if self.address is not None:
            self._unmap(self.address, self.length)


class _Part:
    """One tensor's bytes in a _FileMapping, exposed to numpy; their pages are released when the
    last array over them is freed (a page shared with a neighbour stays until the whole mapping
    goes)."""

    # No per-instance dict: a model has thousands of these, and every object counts towards
    # Python's next full garbage collection.
    __slots__ = ("_mapping", "_address", "_length")

    def __init__(self, mapping: _FileMapping, offset: int, length: int):
        self._mapping, self._address, self._length = mapping, mapping.address + offset, length

    @property
    def __array_interface__(self) -> dict:
        return {"version": 3, "shape": (self._length,), "typestr": "|u1", "data": (self._address, False)}

    def __del__(self) -> None:
        self._mapping.release(self._address, self._length)


class FormatError(ValueError):
    """A file that is not valid .safetensors; the message says what is wrong."""


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets in the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Reader:
    """An open .safetensors file: its entries and metadata at once, each tensor when asked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._size = self.path.stat().st_size
            self.entries, self.metadata, self._data_start = _read_header(self._file, self._size)
        except BaseException:
            self._file.close()
            raise
        self._mapping: _FileMapping | None = None  # made by the first `map`

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._mapping = None  # mapped tensors keep it as long as they need it

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor (its own memory, nothing mapped) holding `key`'s data."""
        entry = self.entries[key]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        buffer = bytearray(entry.nbytes)
        self._file.seek(self._data_start + entry.begin)
        if self._file.readinto(buffer) != entry.nbytes:
            raise FormatError(f"{self.path.name}: the file ends inside tensor {key!r}")
        return torch.frombuffer(buffer, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)

    def map(self, key: str) -> torch.Tensor:
        """`key`'s tensor over a private mapping of the file (see MAPPABLE): its bytes are read
        from the page cache only when used, writes to it stay in this process, and its pages are
        given back when the tensor (and every view of it) is freed. So a model cast tensor by
        tensor to another dtype sheds the file as it goes, where the safetensors package's
        mapping keeps every page it has read until the last tensor is freed. Map a key once:
        freeing one of two tensors over the same bytes would drop the other's private writes."""
        entry = self.entries[key]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if self._mapping is None:
            if not MAPPABLE:
                raise OSError("tensors cannot be mapped on this platform; use Reader.get")
            self._mapping = _FileMapping(self._file.fileno(), self._size)
        part = _Part(self._mapping, self._data_start + entry.begin, entry.nbytes)
        return torch.from_numpy(numpy.asarray(part)).view(entry.dtype).reshape(entry.shape)


def _read_header(file: IO[bytes], size: int) -> tuple[dict[str, Entry], dict[str, str], int]:
    name = Path(getattr(file, "name", "file")).name
    prefix = file.read(8)
    if len(prefix) < 8:
        raise FormatError(f"{name}: too short to be a .safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(_HEADER_LIMIT, size - 8):
        raise FormatError(f"{name}: not a .safetensors file (its header length is out of bounds)")
    try:
        header = json.loads(file.read(length))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{name}: not a .safetensors file (the header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{name}: not a .safetensors file (the header is not a JSON object)")
    metadata = header.pop(METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{name}: the metadata must map names to strings")
    data_size = size - 8 - length
    entries = {}
    for key, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{name}: tensor {key!r} has a malformed header entry") from e
        entry = Entry(key, dtype, shape, begin, end)
        if not 0 <= begin <= end <= data_size or end - begin != entry.nbytes or min(shape, default=0) < 0:
            raise FormatError(f"{name}: tensor {key!r} does not fit the file; it may be truncated or damaged")
        entries[key] = entry
    return entries, dict(metadata), 8 + length


def plan(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[Entry]:
    """Entries laid out one after another in the given order."""
    laid_out, offset = [], 0
    for key, dtype, shape in entries:
        if dtype not in NAMES:
            raise FormatError(f"tensor {key!r}: {dtype} cannot be stored in .safetensors")
        shape = tuple(shape)
        entry = Entry(key, dtype, shape, offset, offset + math.prod(shape) * dtype.itemsize)
        laid_out.append(entry)
        offset = entry.end
    return laid_out


def header_bytes(entries: list[Entry], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header[METADATA] = dict(metadata)
    for e in entries:
        header[e.key] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def write(file: IO[bytes], entries: list[Entry], produce: Callable[[Entry], torch.Tensor],
          metadata: Mapping[str, str] | None = None) -> None:
    """Writes the header for `entries`, then each tensor `produce(entry)` returns, in order;
    each must have its entry's dtype and shape. Only one produced tensor is held at a time."""
    file.write(header_bytes(entries, metadata))
    for entry in entries:
        tensor = produce(entry)
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"tensor {entry.key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned as {entry.dtype} {entry.shape}")
        if entry.nbytes:
            file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        del tensor
