"""``kvtier bench --endpoint URL``: the multi-turn chat benchmark against a running OpenAI-compatible vLLM server.

client.py talks HTTP (streamed completions with token ids, /tokenize, /metrics, /reset_prefix_cache),
metrics.py reads vLLM's and kvtier's Prometheus counters, replay.py replays the conversations, run.py ties
them into results.json / results.md / plots, markdown.py writes the table.
"""
