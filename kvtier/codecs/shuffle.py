"""Byte-plane shuffle for 16-bit data: all low bytes, then all high bytes.

bf16/fp16 KV values share their exponent bytes far more than their mantissa bytes; grouping the planes lets
LZ4/ZSTD find that redundancy. An odd trailing byte stays in place.
"""

from __future__ import annotations

import numpy as np


def shuffle16(data: bytes | memoryview) -> memoryview:
    arr = np.frombuffer(data, dtype=np.uint8)
    half, even = len(arr) // 2, len(arr) - len(arr) % 2
    out = np.empty_like(arr)
    out[:half] = arr[0:even:2]
    out[half:even] = arr[1:even:2]
    out[even:] = arr[even:]
    return memoryview(out)


def unshuffle16(data: bytes | memoryview) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    half, even = len(arr) // 2, len(arr) - len(arr) % 2
    out = np.empty_like(arr)
    out[0:even:2] = arr[:half]
    out[1:even:2] = arr[half:even]
    out[even:] = arr[even:]
    return out.tobytes()
