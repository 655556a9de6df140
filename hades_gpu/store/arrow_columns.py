"""Arrow arrays built from their buffers (and read back), for the columns the writer makes.

Why not `pa.array`: in pyarrow (<= 21) the first `pa.array` call of a process imports pandas to check
whether its argument is a pandas object, ~0.15-0.2 s of CPU and ~40 MB of memory in the ingest's
main process, which never uses pandas (measured: on a 1.6 s feed run that was a tenth of the main
process's CPU). Buffers are what `pa.array` would build: the values as they lie in a NumPy array,
UTF-8 bytes with int32 offsets for strings. Nothing here is needed where pandas is already loaded,
but it is not slower there either.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

_NUMERIC = {np.dtype(np.int32): pa.int32(), np.dtype(np.int64): pa.int64(), np.dtype(np.float32): pa.float32(),
            np.dtype(np.float64): pa.float64()}
_DTYPES = {kind: dtype for dtype, kind in _NUMERIC.items()}
_OFFSET_MAX = 2**31 - 1  # int32 offsets of pa.string()/pa.binary()/pa.list_


def numeric(values: np.ndarray, copy: bool = True) -> pa.Array:
    """A 1-D int32/int64/float32/float64/bool NumPy array as an Arrow array without nulls: a copy, or
    (`copy=False`, as `pa.array` does) a view of `values`' memory, which must then not be reused."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1:
        raise ValueError(f"numeric() takes a 1-D array (got shape {values.shape})")
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    kind = _NUMERIC.get(values.dtype)
    if kind is None:
        raise TypeError(f"numeric() does not take {values.dtype}")
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values.copy() if copy else values)])


def values_of(column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    """The values of an int32/int64/float32/float64 column without nulls as NumPy (`to_numpy` also
    imports pandas): a read-only view of a single chunk, a concatenation of several."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for arr in chunks:
        dtype = _DTYPES.get(arr.type)
        if dtype is None or arr.null_count:
            raise TypeError(f"values_of() takes numeric columns without nulls (got {arr.type}, {arr.null_count} nulls)")
        data = arr.buffers()[1]
        parts.append(np.frombuffer(data, dtype=dtype, count=arr.offset + len(arr))[arr.offset:] if len(arr)
                     else np.zeros(0, dtype=dtype))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=_DTYPES.get(column.type, np.int64))


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > _OFFSET_MAX:
        raise ValueError(f"{offsets[-1]} bytes do not fit a column with 32-bit offsets")
    return offsets.astype(np.int32)


def strings(values: Sequence[str]) -> pa.StringArray:
    """`pa.array(values, pa.string())` for str values without nulls (UTF-8, as pa.array encodes)."""
    encoded = [v.encode("utf-8") for v in values]
    return binaries(encoded, pa.string())


def binaries(values: Sequence[bytes], kind: pa.DataType = pa.binary()) -> pa.Array:
    """`pa.array(values, kind)` for bytes values without nulls (`kind`: binary, or string for UTF-8)."""
    offsets = _offsets([len(v) for v in values])
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))])


def string_lists(values: Sequence[Sequence[str]]) -> pa.ListArray:
    """`pa.array(values, pa.list_(pa.string()))` for lists of str without nulls."""
    flat = [item for items in values for item in items]
    return pa.ListArray.from_arrays(numeric(_offsets([len(items) for items in values])), strings(flat))


__all__ = ["binaries", "numeric", "string_lists", "strings", "values_of"]
