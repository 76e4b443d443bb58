"""The multi-turn chat benchmark behind ``kvtier bench`` (see kvtier/bench/main.py)."""
