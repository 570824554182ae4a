"""The .safetensors format, read and written with NumPy alone (timm's weights on the Hugging Face hub use it).

Layout: 8-byte little-endian header length n; n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
optional "__metadata__": {str: str}}; then the raw little-endian arrays, offsets relative to the byte after the
header. What the names mean for a ViT (timm's state dict) is minivit.pretrained's business, not this module's.
"""
import json
import math
import os
import struct

import numpy as np

from minivit.backend import to_numpy
from minivit.checkpoint import CheckpointError   # one error type for every checkpoint format
from minivit.fileio import atomic_write_bytes


def bf16_to_f32(u16):
    """uint16 bfloat16 bits (any shape) -> float32: the bits become the high half of a float32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


# safetensors dtype codes <-> little-endian NumPy dtypes (BF16 is read as uint16 bits, then upcast)
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_ST_CODES = {np.dtype(v).newbyteorder("<"): k for k, v in _ST_DTYPES.items() if k != "BF16"}
_ST_MAX_HEADER = 100 * 1024 * 1024   # the format's own limit


def read_safetensors(path):
    """path -> ({name: array}, metadata): a .safetensors file read with NumPy alone.

    Layout: 8-byte little-endian header length n; n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
    optional "__metadata__": {str: str}}; then the raw little-endian arrays, offsets relative to the byte after
    the header. BF16 is upcast to float32 (its bits shifted into the high half of a float32); other dtypes are
    kept (in native byte order). Arrays are copies: the file is memory-mapped only while reading.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a .safetensors header", path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise CheckpointError(f"{path}: header length {n} does not fit a file of {size} bytes (truncated or not a "
                                  f".safetensors file)", path)
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the .safetensors header is not valid JSON ({e})", path) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the .safetensors header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    start, data_len = 8 + n, size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r}: {info!r}", path) from e
        if code not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code}, not supported (supported: "
                                  f"{', '.join(_ST_DTYPES)})", path)
        dt = np.dtype(_ST_DTYPES[code])
        nbytes = math.prod(shape) * dt.itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({code} {list(shape)}, {nbytes} bytes) has data_offsets "
                                  f"[{begin}, {end}] but the data section has {data_len} bytes (truncated or corrupt)",
                                  path)
        raw = data[begin:end]
        if code == "BF16":
            a = bf16_to_f32(raw.view(dt))                                  # a new float32 array
        else:
            a = np.array(raw.view(dt), dtype=dt.newbyteorder("="))          # a copy in native byte order
        out[name] = a.reshape(shape)
    del data
    return out, dict(metadata)


def save_safetensors(tensors, path, metadata=None):
    """Write {name: array} as a .safetensors file, atomically (float64/32/16, integer and bool arrays).

    The header is compact JSON padded with spaces to a multiple of 8 bytes (as the reference writer does), the
    arrays follow in the dict's order, little-endian, without gaps. `metadata`: {str: str} or None.
    """
    header, blobs, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"bad tensor name {name!r}")
        a = np.asarray(to_numpy(a))
        dt = a.dtype.newbyteorder("<")
        if dt not in _ST_CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        blob = np.ascontiguousarray(a, dtype=dt).tobytes()
        header[name] = {"dtype": _ST_CODES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    atomic_write_bytes(path, struct.pack("<Q", len(h)) + h + b"".join(blobs))
