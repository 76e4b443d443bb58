"""Shared pytest fixtures. Real-server fixtures (redis_server, seaweed_server) live in tests/servers.py."""

from servers import redis_server, seaweed_server  # noqa: F401  (session-scoped fixtures)
