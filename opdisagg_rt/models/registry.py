"""Which operation builder serves which architecture."""
from __future__ import annotations

import torch

from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.llama import LLAMA_ARCHITECTURES, build_llama_ops


def build_model_ops(loaded, dtype: torch.dtype, max_positions: int) -> list[Op]:
    arch = loaded.config.architecture
    if arch in LLAMA_ARCHITECTURES:
        return build_llama_ops(loaded.config, loaded.weights, dtype, max_positions, origin=loaded.source)
    raise ValueError(f"{loaded.source}: architecture {arch!r} is not supported "
                     f"(supported: {', '.join(LLAMA_ARCHITECTURES)})")
