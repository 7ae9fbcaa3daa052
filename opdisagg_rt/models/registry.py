"""Which operation builder serves which architecture."""
from __future__ import annotations

import torch

from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.gemma3 import GEMMA3_ARCHITECTURES, build_gemma3_ops
from opdisagg_rt.models.llama import LLAMA_ARCHITECTURES, build_llama_ops
from opdisagg_rt.models.minimax import MINIMAX_ARCHITECTURES, build_minimax_ops
from opdisagg_rt.models.moe_models import MOE_ARCHITECTURES, build_moe_ops
from opdisagg_rt.models.qwen3_next import QWEN3_NEXT_ARCHITECTURES, build_qwen3_next_ops

BUILDERS = {**{a: build_llama_ops for a in LLAMA_ARCHITECTURES}, **{a: build_moe_ops for a in MOE_ARCHITECTURES}}
BUILDERS.update({a: build_gemma3_ops for a in GEMMA3_ARCHITECTURES})
BUILDERS.update({a: build_qwen3_next_ops for a in QWEN3_NEXT_ARCHITECTURES})
BUILDERS.update({a: build_minimax_ops for a in MINIMAX_ARCHITECTURES})


def build_model_ops(loaded, dtype: torch.dtype, max_positions: int) -> list[Op]:
    arch = loaded.config.architecture
    builder = BUILDERS.get(arch)
    if builder is None:
        raise ValueError(f"{loaded.source}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(BUILDERS)})")
    # GGUF block forms ride along as `name.kind` entries, found by WeightSource.gguf_blocks.
    weights = loaded.weights | {f"{n}.{kind}": b for n, (kind, b) in loaded.gguf_blocks.items()}
    return builder(loaded.config, weights, dtype, max_positions, origin=loaded.source)
