"""Read and write IDX files (the MNIST / Fashion-MNIST container format), plain or gzip.

Layout of an IDX file (all integers big-endian)::

    byte 0-1   0x00 0x00
    byte 2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
               0x0D float32, 0x0E float64
    byte 3     number of dimensions, ndim >= 1
    then       ndim uint32 sizes d0, d1, ..., d{ndim-1}
    then       d0*d1*...*d{ndim-1} values of the dtype, C order, big-endian

A file is treated as gzip when it starts with the gzip magic bytes 0x1f 0x8b, whatever
its name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Union

import numpy as np

from .._files import atomic_open

__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]

PathLike = Union[str, "os.PathLike[str]"]

# IDX dtype code -> numpy dtype (big-endian, as stored on disk).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (kind, itemsize) -> code, for write_idx; byte order is normalised separately.
_CODE_OF = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _check_path(path, fn: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _describe_codes() -> str:
    return ", ".join(f"0x{c:02X} ({dt.newbyteorder('=').name})" for c, dt in IDX_DTYPES.items())


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    Args:
        path: file to read. Compression is detected from the first two bytes
            (gzip magic 0x1f 0x8b), not from the file name.

    Returns:
        A writable, C-contiguous numpy array in native byte order whose shape is the
        file's dims ``(d0, ..., d{ndim-1})`` and whose dtype follows the dtype code
        (uint8, int8, int16, int32, float32 or float64). E.g. ``train-images-idx3-ubyte``
        gives uint8 ``[60000, 28, 28]`` and ``train-labels-idx1-ubyte`` uint8 ``[60000]``.

    Raises:
        TypeError: ``path`` is not a str / PathLike.
        FileNotFoundError: the file does not exist.
        ValueError: corrupt gzip stream, bad magic number, unknown dtype code, zero
            dimensions, header shorter than its dims, or a payload whose size differs from
            the product of the dims times the item size (truncated or oversized file). The
            message names the file, what was expected and what was found.
    """
    path = _check_path(path, "read_idx")
    with open(path, "rb") as f:
        raw = f.read()

    compressed = raw[:2] == _GZIP_MAGIC
    if compressed:
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(
                f"read_idx: {path!r} starts with the gzip magic bytes but is not a valid gzip "
                f"stream (truncated or corrupt): {e}"
            ) from None
    else:
        data = raw
    what = "decompressed IDX data" if compressed else "IDX file"

    if len(data) < 4:
        raise ValueError(
            f"read_idx: {path!r} is too short for an IDX header: expected at least 4 bytes, "
            f"found {len(data)} bytes in the {what}"
        )
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES:
        raise ValueError(
            f"read_idx: {path!r} has a bad IDX magic number: expected 0x0000TTNN with dtype "
            f"code TT one of {_describe_codes()}, found 0x{data[:4].hex().upper()}"
        )
    if ndim == 0:
        raise ValueError(
            f"read_idx: {path!r} declares 0 dimensions: expected at least 1 (magic "
            f"0x{data[:4].hex().upper()})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"read_idx: {path!r} is truncated in its header: {ndim} dimensions need "
            f"{header} header bytes, found {len(data)} bytes in the {what}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    found = len(data) - header
    if found != expected:
        kind = "truncated" if found < expected else "oversized"
        raise ValueError(
            f"read_idx: {path!r} is {kind}: dims {tuple(dims)} of {dtype.newbyteorder('=').name} "
            f"need a payload of {expected} bytes after the {header}-byte header, found "
            f"{found} bytes in the {what}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    # astype copies: gives a writable array in native byte order.
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array, compress: bool | None = None) -> None:
    """Write an array as an IDX file.

    Args:
        path: destination. Written atomically (temporary file + rename), so an existing
            file is untouched if anything fails.
        array: array-like of shape ``(d0, ..., d{ndim-1})`` with ndim >= 1 (1 to 255) and
            each d < 2**32; dtype uint8, int8, int16, int32, float32 or float64 (any byte
            order; stored big-endian).
        compress: True -> gzip, False -> plain, None (default) -> gzip iff ``path`` ends
            with ``.gz``. Gzip output uses mtime=0 and no file name, so equal arrays give
            byte-identical files.

    Raises:
        TypeError: bad ``path``/``compress`` type or unsupported dtype.
        ValueError: 0 or more than 255 dimensions, or a dimension >= 2**32.
    """
    path = _check_path(path, "write_idx")
    if compress is not None and not isinstance(compress, bool):
        raise TypeError(f"write_idx: compress must be None or bool, got {compress!r}")
    arr = np.asarray(array)
    code = _CODE_OF.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise TypeError(
            f"write_idx: array dtype {arr.dtype} is not supported by IDX; expected one of "
            f"{_describe_codes()}"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(
            f"write_idx: array has {arr.ndim} dimensions (shape {arr.shape}); IDX needs 1 to 255"
        )
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"write_idx: array shape {arr.shape} has a dimension >= 2**32")
    if compress is None:
        compress = path.endswith(".gz")

    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    blob = header + payload
    if compress:
        blob = gzip.compress(blob, compresslevel=9, mtime=0)

    with atomic_open(path, "wb") as f:
        f.write(blob)
