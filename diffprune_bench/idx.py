"""The IDX file format (LeCun's MNIST format, also Fashion-MNIST's), parsed with NumPy.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order, big-endian. No maintained library reads
it on its own (torchvision's reader is tied to its dataset folders and download checks), and the format
is small enough that every size can be checked here: a truncated or padded file is refused with one
line instead of being silently reshaped.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprune_bench.errors import BenchError

#: IDX type codes -> big-endian NumPy dtypes
IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class IdxFile:
    """A decoded IDX file: its array and the MD5 of its uncompressed bytes (what checksums compare)."""

    array: np.ndarray
    md5: str


def parse_idx(data: bytes, name: str, ndim: int | None = None) -> np.ndarray:
    """Decode IDX bytes; ``name`` labels errors, ``ndim`` (when given) is the number of dimensions required."""
    if len(data) < 4:
        raise BenchError(f"{name} is truncated: {len(data)} bytes, shorter than an IDX header (4-byte magic number)")
    zero, code, dims = int.from_bytes(data[:2], "big"), data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zero != 0 or code not in IDX_TYPES or dims == 0:
        raise BenchError(f"{name} is not an IDX file: magic number 0x{magic:08x}; expected 0x0000TTDD with type "
                         f"TT in {', '.join(f'{c:02x}' for c in IDX_TYPES)} and DD >= 1 dimensions "
                         "(images 0x00000803, labels 0x00000801)")
    if ndim is not None and dims != ndim:
        raise BenchError(f"{name} has {dims} dimensions (magic number 0x{magic:08x}); expected {ndim} "
                         f"(magic number 0x0000{code:02x}{ndim:02x})")
    header = 4 + 4 * dims
    if len(data) < header:
        raise BenchError(f"{name} is truncated: {len(data)} bytes, shorter than its {header}-byte IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=dims, offset=4))
    dtype = np.dtype(IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header
    if body != expected:
        what = "truncated" if body < expected else "longer than its header says"
        raise BenchError(f"{name} is {what}: dimensions {'x'.join(map(str, shape))} need {expected} bytes of "
                         f"values, the file holds {body}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: Path, ndim: int | None = None) -> IdxFile:
    """Read an IDX file, gzip-compressed when its name ends in ``.gz``, and hash its uncompressed bytes."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise BenchError(f"{path} is not a complete gzip file ({error or type(error).__name__}): "
                         "replace it with the original") from None
    except OSError as error:
        raise BenchError(f"cannot read {path}: {error.strerror or error}") from None
    return IdxFile(parse_idx(data, path.name, ndim), hashlib.md5(data).hexdigest())
