"""Copies between vLLM's paged KV tensors and host memory: the layout of blocks (layout.py; loads into host KV
caches write blocks directly), the staging pool every other copy goes through (staging.py), the device copies
(copier.py, the only code touching CUDA streams) and their completion (fences.py). Nothing here imports vLLM."""

from kvtier.transfer.copier import KVCopier
from kvtier.transfer.fences import DoneFence, Fence, FenceFactory, FenceWatcher
from kvtier.transfer.layout import KVLayout, LayerLayout
from kvtier.transfer.staging import Slot, StagingPool, StagingTimeout

__all__ = ["DoneFence", "Fence", "FenceFactory", "FenceWatcher", "KVCopier", "KVLayout", "LayerLayout", "Slot",
           "StagingPool", "StagingTimeout"]
