"""The multi-turn chat benchmark behind ``kvtier bench`` (see benchmarks/kvtier_bench/main.py)."""
