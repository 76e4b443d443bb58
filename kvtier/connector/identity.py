"""What a vLLM request adds to its token ids that changes its KV: cache salt, LoRA adapter, prompt embeddings.

Multimodal inputs change KV through features the token ids do not name; such requests are not reused at all
(``reusable`` is False). Everything vLLM's own block hash covers is covered here, or the request is not reused.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from kvtier.keys import BlockExtra, RequestIdentity

if TYPE_CHECKING:
    from vllm.v1.request import Request


def reusable(request: Request) -> bool:
    return not getattr(request, "mm_features", None)


def request_identity(request: Request, epoch: int = 0) -> RequestIdentity:
    lora: Any = getattr(request, "lora_request", None)
    return RequestIdentity(
        cache_salt=getattr(request, "cache_salt", None) or None,
        lora=(str(lora.lora_name), str(getattr(lora, "lora_path", "") or "")) if lora is not None else None,
        epoch=epoch,
    )


def embeddings_extra(request: Request, block_size: int) -> BlockExtra | None:
    """For a prompt-embeds request, block i's key folds in a digest of the embeddings of its positions (the
    token ids of those positions are placeholders); positions past the prompt are real tokens."""
    embeds: Any = getattr(request, "prompt_embeds", None)
    if embeds is None:
        return None
    rows = embeds.detach().to("cpu").contiguous()
    width = f"{rows.dtype}:{list(rows.shape[1:])}".encode()

    def extra(block: int) -> bytes:
        part = rows[block * block_size:(block + 1) * block_size]
        if part.shape[0] == 0:
            return b""
        digest = hashlib.blake2b(width, digest_size=16, person=b"kvtier-embeds")
        digest.update(part.view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
        return digest.digest()

    return extra


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
