"""Attention-score capture for attention-weighted eviction: math (scores), the worker-side hook (capture) and
the bridge from vLLM block ids to kvtier keys and tier policies (feed). Imported only by the worker side."""
