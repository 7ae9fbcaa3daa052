"""Redis tier (redis-py): the store shared by engine processes, possibly on other hosts.

URL as redis-py reads it: `redis://[:password@]host:port/db` (or `rediss://`, `unix://`). Short
socket timeouts turn a down or stalled server into an error within a second, which the store
turns into a miss and a backoff instead of a stalled engine.
"""
from __future__ import annotations

from opdisagg_rt.kvstore.tier import Tier


class RedisTier(Tier):
    def __init__(self, url: str, timeout_s: float = 1.0, ttl_s: int | None = None):
        import redis  # imported here: only engines configured with Redis need the client

        self.url = url
        self.name = "redis://" + url.split("@")[-1].split("://")[-1]  # never log the password
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           health_check_interval=30)

    def contains_many(self, names: list[str]) -> list[bool]:
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.exists(n)
        return [bool(x) for x in pipe.execute()]

    def get(self, name: str) -> bytes | None:
        return self.client.get(name)

    def put(self, name: str, blob: bytes) -> None:
        self.client.set(name, blob, ex=self.ttl_s)

    def delete(self, name: str) -> None:
        self.client.delete(name)

    def close(self) -> None:
        self.client.close()
