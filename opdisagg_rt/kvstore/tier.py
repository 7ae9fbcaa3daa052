"""What every tier offers the store: bytes in, bytes out, by name. Errors propagate; the store
turns them into misses and backs the tier off (store.py), so tiers stay simple."""
from __future__ import annotations


class Tier:
    name: str = "tier"
    verify: bool = True  # checksum on load: False only for bytes that never left this process
    evictions: int = 0

    def contains_many(self, names: list[str]) -> list[bool]:
        raise NotImplementedError

    def get(self, name: str) -> bytes | None:
        raise NotImplementedError

    def put(self, name: str, blob: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
