"""The ``kvtier bench`` options of the endpoint mode (added to kvtier_bench.main's parser)."""

from __future__ import annotations

import argparse
import os

from kvtier.errors import ConfigError

RESET_MODES = ("all", "vllm", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "against a running server",
        "Replay the preset's conversations against an OpenAI-compatible vLLM server instead of starting engines; "
        "--model then names the served model (default: the server's first).")
    group.add_argument("--endpoint", metavar="URL",
                       help="the server's base URL, e.g. http://127.0.0.1:8000 (no credentials in it)")
    group.add_argument("--api-key-env", metavar="VAR",
                       help="environment variable holding the server's API key (sent as a Bearer token, never shown)")
    group.add_argument("--tokenizer", metavar="DIR",
                       help="build prompts with this local tokenizer (default: the server's /tokenize)")
    group.add_argument("--reset", choices=RESET_MODES, default="all",
                       help="before each round, empty vLLM's prefix cache and the connector's store (all, default), "
                            "vLLM's prefix cache only (vllm), or nothing (none); needs VLLM_SERVER_DEV_MODE=1 "
                            "on the server")


def api_key(var: str | None) -> str | None:
    """The key from the named environment variable; the key itself never enters a message."""
    if not var:
        return None
    value = os.environ.get(var, "")
    if not value:
        raise ConfigError(f"--api-key-env: the environment variable {var} is not set or is empty")
    return value
