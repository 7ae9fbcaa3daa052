"""Fixtures for the KV store tests: the real SmolLM2 (float32) and real redis-server processes
on loopback, started and stopped here (tests needing Redis skip if the binary is absent)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

REDIS_PASSWORD = "kvstore-test-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; `kill()` and `start()` again on the same port simulate an outage."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", REDIS_PASSWORD, "--maxmemory", "512mb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not come up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    pytest.importorskip("redis")
    server = RedisServer(_free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def smollm2():
    from opdisagg_rt.models.loader import load_model

    return load_model(None)
