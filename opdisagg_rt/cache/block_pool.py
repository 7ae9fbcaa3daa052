"""Pool of KV blocks: reference counts, a cache of full blocks by prefix hash, LRU eviction.

A block whose reference count drops to zero keeps its contents and hash: it sits in the free
queue (least recently freed first) and is reused on a prefix hit until allocation evicts it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from opdisagg_rt.cache.prefix_hash import BlockHash


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None  # kept for the token check on a prefix hit


# Stands in a sliding-window group's block table for a block that fell out of the window and was
# freed (vLLM's null block). Its id 0 only pads the table: no kernel reads keys below the window.
NULL_BLOCK = KVBlock(0, ref_cnt=1 << 62)


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.enable_caching = enable_caching
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"cannot allocate {n} blocks: only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
            self.num_evictions += 1

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> KVBlock | None:
        block = self.cached.get(block_hash)
        # The token check makes a hash collision a miss rather than wrong output.
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference to cached blocks found by lookup (reviving free ones)."""
        for block in blocks:
            if block is NULL_BLOCK:
                continue
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def cache_block(self, block: KVBlock, block_hash: BlockHash, token_ids: tuple[int, ...]) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        block.token_ids = token_ids
        self.cached[block_hash] = block

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; pass them tail first so a request's later
        blocks are evicted before its earlier (more shareable) ones."""
        for block in blocks:
            if block is NULL_BLOCK:
                continue
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue[block.block_id] = block
                    self.free_queue.move_to_end(block.block_id, last=False)  # uncached: reuse first
                else:
                    self.free_queue[block.block_id] = block

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)
