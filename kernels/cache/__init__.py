"""KV-cache writes: a Triton ``reshape_and_cache`` (slot -1 skipped) and its torch reference."""
from .naive import naive_reshape_and_cache
from .reshape_and_cache import reshape_and_cache

__all__ = ["reshape_and_cache", "naive_reshape_and_cache"]
