"""Safetensors files straight from and into tensor memory: no serialized copy, no
concatenation, no thread team per tensor.

`safetensors.torch.save_file` builds the whole file in memory before writing it, and the
optimizer state used to be concatenated (`torch.cat`) first: two extra copies of every
byte of a 480 MB full-fork checkpoint on the OptimStep's critical path. Here the header is
computed from shapes, and each tensor's bytes go from its own storage to the kernel
(`os.write` of a memoryview). A tensor may be given as several parts (the AdamW moments of
every parameter, one after the other), written back to back as one safetensors tensor.
The file is the format `safetensors.safe_open` / `load_file` read (header: 8-byte length,
JSON padded with spaces to 8 bytes; data offsets relative to the end of the header).
`read_safetensors` reads a small file (an adapter) in one read into one buffer and returns
tensors viewing it: 10 MB in ~1 ms where `load_file` copies each tensor with torch.
`map_safetensors` reads nothing: its tensors view a private memory map of the file, for a
reader that copies them once into memory of its own (the sampler's reloads), so the bytes go
from the page cache to their destination in one user-space copy.

`write_plan` can write over a spare file whose pages were allocated ahead of it
(`headway.store.pages`: why, and what it means for recovery). `write_plan_direct` writes
around the page cache (O_DIRECT), for a large file nobody reads back soon (a full fork's
optimizer state).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CHUNK = 1 << 30  # Linux writes at most ~2 GiB per call
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev takes
# Direct writes: the staging buffer, and the alignment of its address and of every length
# written directly (a filesystem that needs more refuses them: EINVAL, then no direct I/O).
_DIRECT_STAGING = 8 << 20
_DIRECT_ALIGN = 4096
# safetensors dtype name → torch dtype (readers that copy straight into tensors use it too).
TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}
_NP_DTYPES = {  # the safetensors dtypes numpy has (all but BF16)
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without copying when it is contiguous (then writable:
    a reader may fill the tensor through it)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class TensorFilePlan:
    """A safetensors file laid out but not written: its header bytes, the tensors' bytes in
    file order (views of their memory), and its size, known before a byte is written (a
    checkpoint's meta.json records the size of a file written later in the background)."""

    header: bytes
    chunks: list[memoryview]
    size: int


def plan_safetensors(
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> TensorFilePlan:
    """Lay out `tensors` (name → tensor, or → parts concatenated as one 1-D tensor) as a
    safetensors file. The plan views the tensors' memory: write it before they change."""
    layout: dict[str, tuple[torch.dtype, list[int]]] = {}
    chunks: list[memoryview] = []
    for name, value in tensors.items():
        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        dtypes = {p.dtype for p in parts}
        if len(dtypes) != 1:
            raise ValueError(f"{name}: parts of one tensor must share a dtype, got {dtypes}")
        shape = (
            list(parts[0].shape)
            if isinstance(value, torch.Tensor)
            else [sum(p.numel() for p in parts)]
        )
        layout[name] = (dtypes.pop(), shape)
        chunks += [tensor_bytes(p) for p in parts]
    header, size = safetensors_header(layout, metadata)
    return TensorFilePlan(header, chunks, size)


def safetensors_header(
    layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, int]:
    """(header bytes, file size) of a safetensors file of tensors `layout` (name → dtype,
    shape, in file order): what `plan_safetensors` writes for tensors of those dtypes and
    shapes, computed from the layout alone (a deferred file's size is known at once; its
    tensors are read when it is written)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + offset


def write_plan(path: Path, plan: TensorFilePlan, spare: Path | None = None) -> int:
    """Write a planned file to a new file `path` (not fsynced: see headway.store.durable);
    returns its size in bytes. `spare` (a file `headway.store.pages.make_spare` made, of
    any size) becomes `path` and is written over: its pages are already allocated."""
    if spare is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    else:
        os.rename(spare, path)
        fd = os.open(path, os.O_WRONLY)
    try:
        if spare is not None and os.fstat(fd).st_size != plan.size:
            os.ftruncate(fd, plan.size)
        _write_views(fd, [memoryview(plan.header), *plan.chunks])
    finally:
        os.close(fd)
    return plan.size


def write_plan_direct(path: Path, plan: TensorFilePlan) -> int | None:
    """Write a planned file to a new file `path` around the page cache (O_DIRECT); returns
    its size, or None where the filesystem takes no direct writes: then nothing is left at
    `path` (and that filesystem is not asked again), and the caller writes it with
    `write_plan`. Not fsynced: the file's blocks and size, its last partial block (written
    through the cache) and the device's own cache wait for the fsync (see
    headway.store.durable).

    Why, for a file nobody reads back soon (a full fork's optimizer state, read only by a
    restore): written through the page cache, its pages must first be allocated, then be
    written back by the kernel's threads, then dropped, all while the next step computes
    on the same cores; a direct write only copies it through an 8 MiB aligned buffer
    (numpy's copy, which lets go of the GIL). A 324 MB write beside a forward+backward of
    a 58M-parameter model slowed it 9 % through the page cache (with its fsync), 1.6 %
    directly (AMD EPYC Zen 3, 2 cores, ext4 on virtio)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    # Created without O_DIRECT, which is then asked for: an open with O_DIRECT that the
    # filesystem refuses has created the file all the same.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        device = os.fstat(fd).st_dev
        if device in _DIRECT_REFUSED:
            raise _Refused
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct)
            _write_direct(fd, [memoryview(plan.header), *plan.chunks])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _DIRECT_REFUSED.add(device)  # no direct I/O there (or not at 4 KiB alignment)
            raise _Refused from e
    except BaseException as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(e, _Refused):
            return None
        raise
    os.close(fd)
    return plan.size


class _Refused(Exception):
    """The filesystem refused a direct write."""


_DIRECT_REFUSED: set[int] = set()  # st_dev of filesystems that refused a direct write


def _write_direct(fd: int, views: list[memoryview]) -> None:
    """Write `views` back to back to `fd` (open with O_DIRECT, at offset 0) through an
    aligned staging buffer; the last partial block goes through the page cache (a direct
    write's length must be a multiple of the block size)."""
    raw = np.empty(_DIRECT_STAGING + _DIRECT_ALIGN, np.uint8)
    start = -raw.ctypes.data % _DIRECT_ALIGN
    staging = raw[start : start + _DIRECT_STAGING]  # page-aligned, not a copy
    filled = 0
    for view in views:
        src, pos = np.frombuffer(view, np.uint8), 0
        while pos < src.size:
            take = min(src.size - pos, _DIRECT_STAGING - filled)
            np.copyto(staging[filled : filled + take], src[pos : pos + take])
            filled, pos = filled + take, pos + take
            if filled == _DIRECT_STAGING:
                _write_all(fd, staging)
                filled = 0
    aligned = filled - filled % _DIRECT_ALIGN
    if aligned:
        _write_all(fd, staging[:aligned])
    if filled > aligned:
        _buffered(fd)
        _write_all(fd, staging[aligned:filled])


def _buffered(fd: int) -> None:
    """Turn O_DIRECT off on `fd`: what follows goes through the page cache."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _write_all(fd: int, data: np.ndarray) -> None:
    """Write all of `data` at the file's offset. A short write is continued through the
    page cache: it leaves the offset off the block alignment a direct write needs."""
    while data.size:
        n = os.write(fd, data)
        if n <= 0:
            raise OSError(f"write wrote {n} bytes")
        if n < data.size:
            _buffered(fd)
        data = data[n:]


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `tensors` (name → tensor, or → parts concatenated as one 1-D tensor) to a new
    file `path` (not fsynced: see headway.store.durable); returns its size in bytes."""
    return write_plan(path, plan_safetensors(tensors, metadata))


def _write_views(fd: int, views: list[memoryview]) -> None:
    """Write `views` back to back in as few `writev` calls as the kernel takes.

    Why not one write per tensor: the page cache sizes its folios by the write, so small
    writes leave the file in small pages, and a reader that maps the file (the sampler's
    reload) then faults and copies it at a fraction of memcpy speed; one large write lets
    it hold the file in large folios."""
    pending = [v for v in views if v.nbytes]
    done = 0  # views of `pending` written entirely
    while done < len(pending):
        batch, size = [], 0
        for view in pending[done : done + _IOV_MAX]:
            if size == _CHUNK:
                break
            batch.append(view[: _CHUNK - size])
            size += batch[-1].nbytes
        n = os.writev(fd, batch)
        if n <= 0:
            raise OSError(f"writev wrote {n} bytes")
        while n:  # skip what was written: whole views, then into the first one left
            take = min(n, pending[done].nbytes)
            pending[done] = pending[done][take:]
            n -= take
            if not pending[done].nbytes:
                done += 1


def read_header(f: BinaryIO) -> tuple[dict, int]:
    """The JSON header of a safetensors file open at its start, and the file offset its
    data offsets count from."""
    header_len = struct.unpack("<Q", f.read(8))[0]
    return json.loads(f.read(header_len)), 8 + header_len


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of one buffer read in one call."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = torch.empty(size, dtype=torch.uint8)  # not zero-filled: read over at once
        view, got = memoryview(data.numpy()).cast("B"), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path}: file ended at byte {got} of {size}")
            got += n
    header_len = struct.unpack("<Q", view[:8])[0]
    header = json.loads(bytes(view[8 : 8 + header_len]))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        if end == start:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = data[8 + header_len + start : 8 + header_len + end]
        if (8 + header_len + start) % raw.new_empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # not aligned for its dtype (a writer that packs tightly)
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out


def map_bytes(path: Path) -> tuple[np.ndarray, dict, int]:
    """(the bytes of a safetensors file as a uint8 array viewing a private memory map of it,
    its header, the offset its data offsets count from).

    Nothing is read or allocated here; the pages are faulted in as the bytes are read, and
    the map is released with the last view of it. Copy them (into memory of your own) and
    drop them: a writer never changes a file in place (checkpoints are immutable), and
    writes to the array stay private (copy-on-write: torch takes it without a warning)."""
    data, raw, base = map_raw_header(path)
    return data, json.loads(raw), base


def map_raw_header(path: Path) -> tuple[np.ndarray, bytes, int]:
    """`map_bytes` with the header as its JSON bytes, not parsed: a reader that has seen
    the same bytes before (each checkpoint of a model has the same) skips parsing it."""
    with open(path, "rb") as f:
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8)
    header_len = struct.unpack("<Q", data[:8].tobytes())[0]
    return data, data[8 : 8 + header_len].tobytes(), 8 + header_len


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of a safetensors file as a view of a private memory map of it, header):
    see `map_bytes`."""
    data, header, base = map_bytes(path)
    return mapped_tensors(data, header, base), header


def mapped_tensors(data: np.ndarray, header: dict, base: int) -> dict[str, torch.Tensor]:
    """The tensors of a file mapped by `map_bytes` / `map_raw_header` (its bytes `data`,
    parsed `header` and data offset `base`), as views of the map."""
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[base + start : base + end]
        dtype = TORCH_DTYPES[info["dtype"]]
        if (base + start) % dtype.itemsize:
            raw = raw.copy()  # not aligned for its dtype (a writer that packs tightly)
        # Typed in numpy when it can (one torch call per tensor, not three: ~1 vs ~4 µs,
        # and an adapter has ~100 tensors).
        np_dtype = _NP_DTYPES.get(info["dtype"])
        if np_dtype is not None:
            out[name] = torch.from_numpy(raw.view(np_dtype).reshape(info["shape"]))
        else:
            out[name] = torch.from_numpy(raw).view(dtype).reshape(info["shape"])
    return out
