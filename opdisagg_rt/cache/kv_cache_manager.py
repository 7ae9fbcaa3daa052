"""Maps requests to KV blocks: prefix-cache lookup, slot allocation, caching of full blocks."""
from __future__ import annotations

from opdisagg_rt.cache.block_pool import BlockPool, KVBlock
from opdisagg_rt.cache.prefix_hash import hash_block, root_hash


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_extra: bytes = b""):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = hash_extra  # e.g. model fingerprint: never share across models
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many leading blocks are registered

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _update_hashes(self, request, num_tokens: int) -> None:
        """Extend the request's chained block hashes over its first `num_tokens` tokens."""
        hashes = request.block_hashes
        full = num_tokens // self.block_size
        if len(hashes) >= full:
            return
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else root_hash(getattr(request, "cache_salt", None))
        for i in range(len(hashes), full):
            parent = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size], self.hash_extra)
            hashes.append(parent)

    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks. At least one token is always left to compute,
        because the last prompt position must run to produce the next token's logits."""
        if not self.enable_prefix_caching:
            return [], 0
        max_tokens = request.num_tokens - 1
        self._update_hashes(request, max_tokens)
        tokens = request.all_token_ids
        hits = []
        for i, block_hash in enumerate(request.block_hashes[: max_tokens // self.block_size]):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.pool.lookup(block_hash, chunk)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request, num_new_tokens: int, computed_blocks: list[KVBlock] = ()) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens; False (and no change) if they don't fit."""
        blocks = self.req_blocks.get(request.request_id, [])
        num_needed = -(-(request.num_computed_tokens + len(computed_blocks) * self.block_size
                         + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(computed_blocks)
        # Reviving cached blocks that sit in the free queue also takes them out of it.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            blocks = blocks + list(computed_blocks)
            self.num_cached_blocks[request.request_id] = len(blocks)
        if num_new_blocks > 0:
            blocks = blocks + self.pool.allocate(num_new_blocks)
        self.req_blocks[request.request_id] = blocks
        return True

    def cache_full_blocks(self, request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        start = self.num_cached_blocks.get(request.request_id, 0)
        full = min(num_computed_tokens // self.block_size, len(blocks))
        if full <= start:
            return
        self._update_hashes(request, full * self.block_size)
        tokens = request.all_token_ids
        for i in range(start, full):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            self.pool.cache_block(blocks[i], request.block_hashes[i], chunk)
        self.num_cached_blocks[request.request_id] = full

    def free(self, request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))
