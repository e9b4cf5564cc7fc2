"""Packing numpy arrays into `headway.v1.Tensor` and reading them back, with validation.

This module owns the wire format of arrays (see `Tensor` in protos/headway/v1/common.proto):
packed little-endian bytes, row-major, one `DType` per tensor. Reading a tensor checks
everything a client can get wrong (dtype, shape, byte count, token ids, non-finite floats)
and raises `InvalidArgument` with a message that starts with the field's path, e.g.
"data[2].datum.weights: ...", and says what to fix.

Writing (`to_tensor`) is done by our own code (SDK requests, server replies), so a bad
input there is a programming error and raises `TypeError` / `ValueError` instead.

numpy only: no torch, no grpc, so the SDK and the gateway can import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from headway.errors import InvalidArgument
from headway.v1 import common_pb2

DType = common_pb2.DType

# Wire layout of each dtype. BFLOAT16 is read as raw uint16 and widened to float32, since
# numpy has no bfloat16. Explicit "<" so the bytes are little-endian on any host.
_WIRE: dict[int, np.dtype] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_BOOL: np.dtype("?"),
}

# numpy dtypes that map one-to-one onto a wire dtype, keyed by (kind, itemsize) so byte
# order does not matter.
_BY_NUMPY: dict[tuple[str, int], int] = {
    ("f", 4): common_pb2.DTYPE_FLOAT32,
    ("f", 8): common_pb2.DTYPE_FLOAT64,
    ("f", 2): common_pb2.DTYPE_FLOAT16,
    ("i", 4): common_pb2.DTYPE_INT32,
    ("i", 8): common_pb2.DTYPE_INT64,
    ("b", 1): common_pb2.DTYPE_BOOL,
}

_INT32 = np.iinfo(np.int32)
_INT64 = np.iinfo(np.int64)
# Dimensions a tensor may have (numpy's own limit is 64; every array of the API is 1-D).
MAX_DIMS = 32
# Bytes numpy can address: an empty array's other dimensions must not multiply past it.
_MAX_BYTES = 2**63 - 1

TOKEN_DTYPES = (common_pb2.DTYPE_INT32, common_pb2.DTYPE_INT64)
FLOAT_DTYPES = (
    common_pb2.DTYPE_FLOAT32,
    common_pb2.DTYPE_FLOAT64,
    common_pb2.DTYPE_FLOAT16,
    common_pb2.DTYPE_BFLOAT16,
)


def dtype_name(dtype: int) -> str:
    """The enum name of a DType value ("DTYPE_INT32"), or "unknown dtype 42"."""
    try:
        return DType.Name(dtype)
    except ValueError:
        # proto3 enums are open: a client may send a number this build does not know.
        return f"unknown dtype {dtype}"


def itemsize(dtype: int) -> int:
    """Bytes per element of a DType value; ValueError for UNSPECIFIED or unknown values."""
    if dtype not in _WIRE:
        raise ValueError(f"{dtype_name(dtype)} has no item size")
    return _WIRE[dtype].itemsize


# ---------------------------------------------------------------------------- writing


def _fits(values: np.ndarray, info: np.iinfo) -> bool:
    # An empty array fits anything; min()/max() would raise on it.
    return values.size == 0 or (int(values.min()) >= info.min and int(values.max()) <= info.max)


def _default_dtype(values: np.ndarray, has_own_dtype: bool) -> int:
    """The wire dtype `to_tensor` picks when the caller does not name one."""
    kind = values.dtype.kind
    if has_own_dtype:
        exact = _BY_NUMPY.get((kind, values.dtype.itemsize))
        if exact is not None:
            return exact
        # Narrower or unsigned integers widen losslessly instead of being refused.
        if kind in "iu":
            return common_pb2.DTYPE_INT32 if _fits(values, _INT32) else common_pb2.DTYPE_INT64
        raise TypeError(f"cannot pack a numpy array of dtype {values.dtype} into a Tensor")
    # A Python sequence or scalar: the most compact dtype that holds the values exactly,
    # and FLOAT32 for floats (the API's float type; FLOAT64 is only accepted, not preferred).
    if kind == "b":
        return common_pb2.DTYPE_BOOL
    if kind in "iu":
        return common_pb2.DTYPE_INT32 if _fits(values, _INT32) else common_pb2.DTYPE_INT64
    if kind == "f":
        return common_pb2.DTYPE_FLOAT32
    raise TypeError(
        f"cannot pack {values.dtype} values into a Tensor: use numbers or bools "
        "(integers must fit in int64)"
    )


def _cast(values: np.ndarray, dtype: int) -> np.ndarray:
    """`values` as the little-endian numpy dtype of `dtype`, refusing lossy conversions."""
    kind = values.dtype.kind
    target = _WIRE[dtype]
    if values.size == 0:
        # Nothing to lose, and `np.asarray([])` is float64 whatever the caller meant.
        pass
    elif dtype in TOKEN_DTYPES:
        if kind not in "iub":
            raise TypeError(f"cannot pack {values.dtype} values as {dtype_name(dtype)}")
        info = _INT32 if dtype == common_pb2.DTYPE_INT32 else _INT64
        if kind != "b" and not _fits(values, info):
            raise ValueError(f"values do not fit {dtype_name(dtype)}")
    elif dtype == common_pb2.DTYPE_BOOL:
        if kind != "b":
            raise TypeError(f"cannot pack {values.dtype} values as DTYPE_BOOL")
    elif kind not in "iubf":
        raise TypeError(f"cannot pack {values.dtype} values as {dtype_name(dtype)}")
    # astype also converts a big-endian array to the little-endian wire order; the caller's
    # tobytes(order="C") takes care of layout (ascontiguousarray would turn a 0-d array 1-d).
    return values.astype(target, copy=False)


def to_tensor(array: Any, dtype: int | None = None) -> common_pb2.Tensor:
    """Pack a numpy array, a Python (nested) sequence or a scalar into a Tensor.

    Without `dtype`: an array (anything with a numpy `dtype`) keeps its type: float32,
    float64, float16, int32, int64 and bool map directly, other integer widths widen to
    INT32 / INT64. A Python sequence of ints becomes INT32 if every value fits, else
    INT64; of floats, FLOAT32; of bools, BOOL. Pass `dtype` (a `DType` value) to choose,
    e.g. `to_tensor([], common_pb2.DTYPE_INT32)` for an empty token array, whose type a
    list cannot convey. DTYPE_BFLOAT16 rounds to nearest even (see `to_tensor_bf16`).

    The bytes are little-endian and C-ordered whatever the input's layout. Raises
    `TypeError` for values that cannot be packed (strings, floats as INT32, ...) and
    `ValueError` for integers that overflow the chosen dtype or ragged sequences.
    """
    has_own_dtype = hasattr(array, "dtype")
    values = np.asarray(array)
    if dtype is None:
        dtype = _default_dtype(values, has_own_dtype)
    if dtype == common_pb2.DTYPE_BFLOAT16:
        return to_tensor_bf16(values)
    if dtype not in _WIRE:
        raise ValueError(f"cannot pack into {dtype_name(dtype)}")
    packed = _cast(values, dtype)
    return common_pb2.Tensor(data=packed.tobytes(order="C"), dtype=dtype, shape=packed.shape)


def to_tensor_bf16(values: Any) -> common_pb2.Tensor:
    """Pack float values as DTYPE_BFLOAT16, rounding float32 to nearest, ties to even.

    NaN stays NaN (a quiet NaN); values beyond bfloat16's range round to +-inf, as in
    torch's conversion.
    """
    f32 = np.asarray(values, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    # Add 0x7FFF plus the lowest kept bit, then truncate: round half to even. uint64 so the
    # carry out of 0xFFFF.... cannot wrap.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    # Rounding a NaN whose payload sits only in the low 16 bits would carry into inf.
    rounded[np.isnan(f32)] = 0x7FC0
    data = rounded.astype("<u2").tobytes(order="C")
    return common_pb2.Tensor(data=data, dtype=common_pb2.DTYPE_BFLOAT16, shape=f32.shape)


# ---------------------------------------------------------------------------- reading


def is_set(msg: Message, field: str) -> bool:
    """True when the Tensor field `field` of `msg` is present.

    A Tensor that is set but entirely default (`Tensor()`: no data, no shape, dtype
    UNSPECIFIED) counts as absent: common.proto makes UNSPECIFIED invalid only on a tensor
    that has data or a shape, and such a tensor carries no array.
    """
    return msg.HasField(field) and getattr(msg, field).ByteSize() > 0


def _shape_str(shape: Sequence[int]) -> str:
    """The shape for a message, bounded: a client may send millions of dimensions."""
    if len(shape) > 8:
        return "[" + ", ".join(str(d) for d in shape[:8]) + f", ... ({len(shape)} dimensions)]"
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _describe(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "inf" if value > 0 else "-inf"


def declared_size(t: common_pb2.Tensor) -> int:
    """The number of elements a Tensor claims to hold, read from its bytes, never decoded.

    Limits (context length, batch tokens) are checked with this before any decoding, so an
    oversized request costs no work proportional to its size. It is a bound, not a check:
    `from_tensor` still validates the dtype, shape and byte count. The count is the data
    size divided by the item size (0 for an unknown dtype), so a shape that claims more
    elements than the bytes hold cannot inflate or hide it.
    """
    size = _WIRE[t.dtype].itemsize if t.dtype in _WIRE else 0
    return len(t.data) // size if size else 0


def from_tensor(t: common_pb2.Tensor, what: str) -> np.ndarray:
    """Decode a Tensor into an array of its dtype and shape (BFLOAT16 becomes float32).

    The result is a read-only view of the message's bytes (or a fresh array for BFLOAT16),
    so callers cannot modify the request by writing to it; copy it to get a writable one.
    Raises `InvalidArgument`, prefixed with `what`, for an unspecified or unknown dtype,
    more than MAX_DIMS dimensions, a negative dimension, a byte count that does not match
    the shape, or an empty shape whose other dimensions no array could hold.
    """
    if t.dtype == common_pb2.DTYPE_UNSPECIFIED:
        raise InvalidArgument(
            f"{what}: dtype is DTYPE_UNSPECIFIED: set it to the element type of data "
            "(DTYPE_INT32 or DTYPE_INT64 for token ids, DTYPE_FLOAT32 for floats)"
        )
    if t.dtype not in _WIRE:
        raise InvalidArgument(
            f"{what}: {dtype_name(t.dtype)} is not a DType this server knows: use one of "
            + ", ".join(DType.Name(d) for d in _WIRE)
        )
    shape = list(t.shape)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"{what}: shape {_shape_str(shape)} has more than {MAX_DIMS} dimensions: token "
            "and float arrays are 1-D (shape [N])"
        )
    for axis, size in enumerate(shape):
        if size < 0:
            raise InvalidArgument(
                f"{what}: shape {_shape_str(shape)} has negative dimension {size} at index "
                f"{axis}: every dimension must be >= 0"
            )
    wire = _WIRE[t.dtype]
    # Python ints: a product of large dims must not wrap around as it would in int64.
    count = math.prod(shape)
    expected = count * wire.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: data has {len(t.data)} bytes but shape {_shape_str(shape)} of "
            f"{dtype_name(t.dtype)} needs {expected} ({count} elements x {wire.itemsize} "
            "bytes): pack product(shape) elements, little-endian, with no padding"
        )
    if count == 0 and math.prod(d for d in shape if d) * wire.itemsize > _MAX_BYTES:
        raise InvalidArgument(
            f"{what}: shape {_shape_str(shape)} holds no elements, but its other dimensions "
            "multiply past what an array can address: give an empty array shape [0]"
        )
    flat = np.frombuffer(t.data, dtype=wire)
    if t.dtype == common_pb2.DTYPE_BOOL:
        # numpy would accept any non-zero byte as True but keep it as is, so 2 != True
        # downstream; the wire format allows only 0 and 1.
        raw = flat.view(np.uint8)
        bad = np.flatnonzero(raw > 1)
        if bad.size:
            pos = int(bad[0])
            raise InvalidArgument(
                f"{what}: byte {int(raw[pos])} at position {pos} is not a bool: "
                "DTYPE_BOOL elements are 0 (false) or 1 (true)"
            )
    if t.dtype == common_pb2.DTYPE_BFLOAT16:
        # bfloat16 is the upper half of a float32: shift it back into place.
        widened = (flat.astype(np.uint32) << 16).view(np.float32)
        return widened.reshape(shape)
    # Native byte order for arithmetic (a no-op on little-endian hosts, which keeps it a
    # zero-copy view of the request).
    return flat.astype(wire.newbyteorder("="), copy=False).reshape(shape)


def _require_1d(values: np.ndarray, what: str, kind: str) -> None:
    if values.ndim != 1:
        raise InvalidArgument(
            f"{what}: {kind} must be 1-D (shape [N]), got shape {_shape_str(values.shape)}"
        )


def tokens(t: common_pb2.Tensor, what: str) -> np.ndarray:
    """Decode a 1-D token-id tensor (INT32 or INT64) into a fresh, writable int64 array.

    Raises `InvalidArgument` for another dtype, another rank, or a negative id. The upper
    bound (the vocabulary) is the model's, checked separately.
    """
    if t.dtype not in TOKEN_DTYPES and t.dtype != common_pb2.DTYPE_UNSPECIFIED:
        raise InvalidArgument(
            f"{what}: token ids must be DTYPE_INT32 or DTYPE_INT64, got {dtype_name(t.dtype)}"
        )
    values = from_tensor(t, what)
    _require_1d(values, what, "token ids")
    ids = np.array(values, dtype=np.int64)
    negative = np.flatnonzero(ids < 0)
    if negative.size:
        pos = int(negative[0])
        raise InvalidArgument(
            f"{what}: token id {int(ids[pos])} at position {pos}: token ids are >= 0"
        )
    return ids


def require_finite(values: np.ndarray, what: str, *, where: np.ndarray | None = None) -> None:
    """Raise `InvalidArgument` naming the first NaN / inf of 1-D `values`.

    With `where` (a bool mask of the same length) only those positions must be finite.
    """
    bad = ~np.isfinite(values)
    if where is not None:
        bad &= where
    positions = np.flatnonzero(bad)
    if positions.size:
        pos = int(positions[0])
        raise InvalidArgument(
            f"{what}: {_describe(float(values[pos]))} at position {pos}: values must be finite"
        )


def floats(t: common_pb2.Tensor, what: str, *, finite: bool = True) -> np.ndarray:
    """Decode a 1-D float tensor into a fresh, writable float32 array.

    FLOAT32 is the API's float type; FLOAT64, FLOAT16 and BFLOAT16 are accepted and
    converted. Raises `InvalidArgument` for another dtype or rank, for a FLOAT64 value
    beyond float32's range, and (when `finite`) for a NaN or inf, naming its position.
    """
    if t.dtype not in FLOAT_DTYPES and t.dtype != common_pb2.DTYPE_UNSPECIFIED:
        raise InvalidArgument(
            f"{what}: floats must be DTYPE_FLOAT32 (or DTYPE_FLOAT64), got {dtype_name(t.dtype)}"
        )
    values = from_tensor(t, what)
    _require_1d(values, what, "floats")
    if finite:
        require_finite(values, what)
    with np.errstate(over="ignore"):  # overflow is reported below, with its position
        out = np.array(values, dtype=np.float32)
    if t.dtype == common_pb2.DTYPE_FLOAT64:
        # A finite float64 such as 1e300 would silently become inf in float32.
        overflow = np.flatnonzero(np.isfinite(values) & ~np.isfinite(out))
        if overflow.size:
            pos = int(overflow[0])
            raise InvalidArgument(
                f"{what}: value {float(values[pos])!r} at position {pos} is outside the "
                "float32 range (about +-3.4e38)"
            )
    return out
