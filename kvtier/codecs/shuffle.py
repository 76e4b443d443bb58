"""Byte-plane shuffle for 16-bit data: all low bytes, then all high bytes.

bf16/fp16 KV values share their exponent bytes far more than their mantissa bytes; grouping the planes lets
LZ4/ZSTD find that redundancy. An odd trailing byte stays in place.
"""

from __future__ import annotations

import numpy as np


def shuffle16(data: bytes | memoryview) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    even = len(arr) - (len(arr) % 2)
    planes = arr[:even].reshape(-1, 2).T.tobytes()
    return planes + arr[even:].tobytes()


def unshuffle16(data: bytes | memoryview) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    even = len(arr) - (len(arr) % 2)
    pairs = arr[:even].reshape(2, -1).T.tobytes()
    return pairs + arr[even:].tobytes()
