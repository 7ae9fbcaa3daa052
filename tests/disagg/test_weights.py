"""A stage builds only its operations, from the checkpoint tensors op_weight_names maps to them;
an operation built without one of its tensors is an error, never silently wrong weights."""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.disagg import weights as W
from opdisagg_rt.models.loader import load_model
from tests.models.test_window_families import gemma3_dir  # noqa: F401 - fixture


def partial(loaded, ops: set[str]):
    names = list(loaded.weights)
    wanted = {n for op in ops for n in W.op_weight_names(op, names)}
    return W.build_ops_partial(loaded, torch.float32, 64, {k: v for k, v in loaded.weights.items() if k in wanted},
                               keep=ops)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "gemma3_dir"])
def test_stage_ops_built_from_their_own_weights(fixture, request):
    loaded = load_model(request.getfixturevalue(fixture))
    ops = partial(loaded, {"layers.1.attn_norm", "layers.1.o_proj", "layers.1.mlp"})
    full = {op.name: op for op in W.build_ops_partial(loaded, torch.float32, 64, loaded.weights)}
    for op in ops:
        for k, p in op.parameters().items():
            assert torch.equal(p, full[op.name].parameters()[k]), (op.name, k)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "gemma3_dir"])
def test_an_unmapped_weight_is_an_error(fixture, request, monkeypatch):
    # Gemma-3's norms hold 1 + w (a derived tensor, not a view of the checkpoint's): caught too.
    loaded = load_model(request.getfixturevalue(fixture))
    monkeypatch.setitem(W._LAYER_WEIGHTS, "o_proj", ("self_attn.o_proj.",))
    monkeypatch.setitem(W._LAYER_WEIGHTS, "mlp_norm", ("pre_feedforward_layernorm.",))
    op = "layers.1.o_proj" if fixture == "gemma3_dir" else "layers.1.mlp_norm"
    with pytest.raises(RuntimeError, match=rf"operation '{op}' was built without its weights"):
        partial(loaded, {op})
