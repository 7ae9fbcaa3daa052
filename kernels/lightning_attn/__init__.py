"""MiniMax Lightning attention (per-head scalar-decay linear attention): chunked prefill
forward and fused recurrent decode, with naive torch references."""
from .chunk import chunk_lightning_attn
from .fused_recurrent import fused_recurrent_lightning_attn
from .naive import naive_chunk_lightning_attn, naive_recurrent_lightning_attn

__all__ = ["chunk_lightning_attn", "fused_recurrent_lightning_attn",
           "naive_chunk_lightning_attn", "naive_recurrent_lightning_attn"]
