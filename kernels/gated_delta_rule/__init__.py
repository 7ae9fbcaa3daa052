"""Gated DeltaNet (Qwen3-Next) gated delta rule: chunked prefill forward and fused recurrent
decode, with naive torch references."""
from .chunk import chunk_gated_delta_rule
from .fused_recurrent import fused_recurrent_gated_delta_rule
from .naive import l2norm, naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
           "naive_chunk_gated_delta_rule", "naive_recurrent_gated_delta_rule", "l2norm"]
