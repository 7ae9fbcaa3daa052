"""Maps requests to KV blocks: prefix-cache lookup, slot allocation, caching of full blocks.

Hybrid models (vLLM v1's hybrid KV cache manager): the attention layers are split into *KV cache
groups*, each with one block table per request, all drawing on one shared block pool.
- A full-attention group keeps every block of the sequence.
- A sliding-window group (window `w`) frees the blocks nobody will read again. A query at
  position p reads keys in (p - w, p]; the next step's first query sits at position
  `num_computed_tokens` (later queries of a chunk only need later keys), so every key below
  `num_computed_tokens - w + 1` is dead: blocks `[0, (num_computed_tokens - w + 1) // block_size)`
  are freed when the request is next allocated (the block holding the first live key stays). Their
  table entries become NULL_BLOCK (id 0, never read: the kernels mask keys below the window).
  A decoding sequence therefore holds at most ceil(w / block_size) + 1 blocks of that group.
- An optional StatePool (linear-attention layers) gives each request one fixed-size state slot,
  taken at its first allocation and released with its blocks (finish, abort, preemption).

Prefix caching with sliding-window groups (vLLM's rule): every group caches its full blocks under
its own key (the chained block hash tagged with the group). A hit of j blocks (tokens [0, j*bs))
needs, in each full-attention group, all blocks [0, j), and in each window-w group only the blocks
holding the keys the first computed query (position j*bs) reads: [(j*bs - w + 1) // bs, j); the
rest of that group's table is NULL_BLOCK. The longest j that satisfies every group is the hit.
Models with linear-attention layers (a state pool) get no prefix caching, with a logged reason:
their states are not snapshotted at block boundaries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from opdisagg_rt.cache.block_pool import NULL_BLOCK, BlockPool, KVBlock
from opdisagg_rt.cache.prefix_hash import hash_block, root_hash
from opdisagg_rt.cache.state_pool import StatePool

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """Attention layers sharing one block table: all full attention (window None) or all with
    the same sliding window."""
    layer_names: tuple[str, ...] = ()
    window: int | None = None


@dataclass(slots=True)
class KVCacheSpec:
    groups: list[KVGroupSpec] = field(default_factory=lambda: [KVGroupSpec()])
    state_pool: StatePool | None = None  # linear-attention states, if the model has such layers

    @property
    def has_windows(self) -> bool:
        return any(g.window is not None for g in self.groups)


class GroupHits(list):
    """Prefix-cache hit of a multi-group model: one block list per group (NULL_BLOCK below a
    window). Opaque to the scheduler, which hands it back to allocate_slots."""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_extra: bytes = b"", spec: KVCacheSpec | None = None):
        self.block_size = block_size
        self.spec = spec if spec is not None else KVCacheSpec()
        self.groups = self.spec.groups
        self.windows = [g.window for g in self.groups]
        self.state_pool = self.spec.state_pool
        self.prefix_caching_disabled_reason = None
        if enable_prefix_caching and self.state_pool is not None:
            self.prefix_caching_disabled_reason = ("linear-attention layers (their recurrent states are "
                                                   "not snapshotted per block)")
            logger.warning("prefix caching disabled: the model has %s", self.prefix_caching_disabled_reason)
            enable_prefix_caching = False
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = hash_extra  # e.g. model fingerprint: never share across models
        self.group_blocks: list[dict[str, list[KVBlock]]] = [{} for _ in self.groups]
        # per group: how many leading blocks of each request are registered in the prefix cache
        self.group_cached: list[dict[str, int]] = [{} for _ in self.groups]
        # Blocks that fell out of a sliding window and went back to the pool (metric).
        self.num_window_freed_blocks = 0

    def hybrid_reason(self) -> str | None:
        """Why this model's cache cannot be shared by prefix (prefix cache, KV store), or None."""
        reasons = []
        if self.spec.has_windows:
            reasons.append("sliding-window KV cache groups (blocks outside the window are freed, "
                           f"windows {sorted({w for w in self.windows if w is not None})})")
        if self.state_pool is not None:
            reasons.append("linear-attention layers (their recurrent states are not snapshotted per block)")
        return "; ".join(reasons) or None

    # -- views -----------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def req_blocks(self) -> dict[str, list[KVBlock]]:
        """Group 0's blocks per request (the only group of a full-attention model)."""
        return self.group_blocks[0]

    @property
    def num_cached_blocks(self) -> dict[str, int]:
        return self.group_cached[0]

    @property
    def _plain(self) -> bool:
        """One full-attention group: the original single-table layout."""
        return len(self.groups) == 1 and self.windows[0] is None

    @staticmethod
    def _group_key(block_hash: bytes, g: int) -> bytes:
        """Group g's cache key of a block hash (group 0 keeps the plain hash)."""
        return block_hash if g == 0 else block_hash + g.to_bytes(2, "little")

    def block_table(self, request_id: str, group: int = 0) -> list[int]:
        return [b.block_id for b in self.group_blocks[group].get(request_id, ())]

    def block_tables(self, request_id: str) -> list[list[int]]:
        return [self.block_table(request_id, g) for g in range(len(self.groups))]

    def state_index(self, request_id: str) -> int:
        return self.state_pool.index(request_id) if self.state_pool is not None else -1

    def num_live_blocks(self, request_id: str, group: int = 0) -> int:
        return sum(1 for b in self.group_blocks[group].get(request_id, ()) if b is not NULL_BLOCK)

    # -- prefix cache ----------------------------------------------------------------------------

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
        if not self._plain:
            return self._hybrid_hits(request, max_tokens // self.block_size)
        tokens = request.all_token_ids
        hits = []
        for i, block_hash in enumerate(request.block_hashes[: max_tokens // self.block_size]):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.pool.lookup(block_hash, chunk)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _hybrid_hits(self, request, max_blocks: int) -> tuple[GroupHits | list, int]:
        bs, tokens, hashes = self.block_size, request.all_token_ids, request.block_hashes
        found: dict[tuple[int, int], KVBlock | None] = {}

        def lookup(g: int, i: int) -> KVBlock | None:
            if (g, i) not in found:
                chunk = tuple(tokens[i * bs:(i + 1) * bs])
                found[g, i] = self.pool.lookup(self._group_key(hashes[i], g), chunk)
            return found[g, i]

        j = max_blocks
        for g, w in enumerate(self.windows):  # full attention: a contiguous prefix
            if w is None:
                n = 0
                while n < j and lookup(g, n) is not None:
                    n += 1
                j = n
        while j > 0:  # windows: the blocks the first computed query reads, for the largest j
            missing = None
            for g, w in enumerate(self.windows):
                if w is None:
                    continue
                first = max(j * bs - w + 1, 0) // bs
                missing = next((i for i in range(j - 1, first - 1, -1) if lookup(g, i) is None), None)
                if missing is not None:
                    break
            if missing is None:
                break
            j = missing  # any hit covering block `missing` inside its window fails too
        if j == 0:
            return [], 0
        hits = GroupHits()
        for g, w in enumerate(self.windows):
            first = 0 if w is None else max(j * bs - w + 1, 0) // bs
            hits.append([NULL_BLOCK] * first + [lookup(g, i) for i in range(first, j)])
        return hits, j * bs

    # -- allocation ------------------------------------------------------------------------------

    def remove_skipped_blocks(self, request, num_computed_tokens: int | None = None) -> int:
        """Free the sliding-window groups' blocks no future query reads; returns how many."""
        c = request.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        freed_total = 0
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            blocks = self.group_blocks[g].get(request.request_id)
            if not blocks:
                continue
            first_live = max(c - window + 1, 0)  # the smallest key position a next query reads
            end = min(first_live // self.block_size, len(blocks))
            freed = []
            for i in range(end - 1, -1, -1):  # tail first; stop at the already-freed prefix
                if blocks[i] is NULL_BLOCK:
                    break
                freed.append(blocks[i])
                blocks[i] = NULL_BLOCK
            if freed:
                self.pool.free(freed)
                freed_total += len(freed)
                logger.debug("request %s: freed %d blocks of KV group %d (window %d) below token %d",
                             request.request_id, len(freed), g, window, first_live)
        self.num_window_freed_blocks += freed_total
        return freed_total

    def allocate_slots(self, request, num_new_tokens: int, computed_blocks: list[KVBlock] = ()) -> bool:
        """Reserve blocks (every group) and a state slot for `num_new_tokens` more tokens, after
        the prefix-cache hit `computed_blocks` (from get_computed_blocks); False (and no
        allocation) if they don't fit."""
        rid = request.request_id
        self.remove_skipped_blocks(request)
        if isinstance(computed_blocks, GroupHits):
            per_group = [list(h) for h in computed_blocks]
        else:
            per_group = [list(computed_blocks)] + [[] for _ in range(len(self.groups) - 1)]
        num_hit_blocks = len(per_group[0])
        total = request.num_computed_tokens + num_hit_blocks * self.block_size + num_new_tokens
        num_needed = -(-total // self.block_size)
        new_per_group = [max(num_needed - len(self.group_blocks[g].get(rid, ())) - len(per_group[g]), 0)
                         for g in range(len(self.groups))]
        # Reviving cached blocks that sit in the free queue also takes them out of it.
        num_revived = sum(1 for hits in per_group for b in hits if b is not NULL_BLOCK and b.ref_cnt == 0)
        if sum(new_per_group) + num_revived > self.pool.num_free_blocks:
            return False
        if self.state_pool is not None and self.state_pool.index(rid) < 0 and self.state_pool.num_free == 0:
            return False
        if self.state_pool is not None:
            self.state_pool.allocate(rid)
        for g, n in enumerate(new_per_group):
            blocks = self.group_blocks[g].get(rid, [])
            if per_group[g]:
                self.pool.touch(per_group[g])
                blocks = blocks + per_group[g]
                self.group_cached[g][rid] = len(blocks)
            if n > 0:
                blocks = blocks + self.pool.allocate(n)
            self.group_blocks[g][rid] = blocks
        return True

    def cache_full_blocks(self, request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed tokens in the prefix cache
        (each group under its own key; blocks already freed from a window are skipped)."""
        if not self.enable_prefix_caching:
            return
        rid, bs = request.request_id, self.block_size
        for g, cached in enumerate(self.group_cached):
            blocks = self.group_blocks[g].get(rid, [])
            start = cached.get(rid, 0)
            full = min(num_computed_tokens // bs, len(blocks))
            if full <= start:
                continue
            self._update_hashes(request, full * bs)
            tokens = request.all_token_ids
            for i in range(start, full):
                if blocks[i] is NULL_BLOCK:
                    continue
                chunk = tuple(tokens[i * bs:(i + 1) * bs])
                self.pool.cache_block(blocks[i], self._group_key(request.block_hashes[i], g), chunk)
            cached[rid] = full

    def free(self, request) -> None:
        for group in self.group_blocks:
            blocks = group.pop(request.request_id, [])
            self.pool.free([b for b in reversed(blocks) if b is not NULL_BLOCK])
        for cached in self.group_cached:
            cached.pop(request.request_id, None)
        if self.state_pool is not None:
            self.state_pool.free(request.request_id)
