"""Makes ``import vllm`` fail in this Python process: put this directory first on PYTHONPATH.

scripts/gpu-check.sh runs its Python parts with it, so they show that they need no vLLM even on a machine
where vLLM is installed; tests/test_no_vllm.py does the same on CPU. (It shadows any other sitecustomize.)
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


class _NoVLLM(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by scripts/novllm: this must run "
                                      "without vLLM)", name=name)
        return None


sys.meta_path.insert(0, _NoVLLM())
