"""Linear-attention (state-pool) layers on stage workers: the tiny Qwen3-Next (Gated DeltaNet
layers with their conv and recurrent states, gated full attention, MoE) split over stages gives
the colocated engine's tokens, including under preemption, where a slot handed out again must
start from the empty state on the stage that holds it."""
from __future__ import annotations

import pytest

from tests.models.test_minimax import _engine as minimax_engine, _params as minimax_params
from tests.models.test_minimax import _prompts as minimax_prompts, minimax  # noqa: F401 - fixture
from tests.models.test_qwen3_next import SMALL, STATE_SLOT, _engine, _params, _prompts, qwen3_next  # noqa: F401

SPECS = {
    # every attention layer (linear and full) on one stage, the rest on the other: 2 visits per layer
    "attn_rest_mb2": {"stages": {"attn": {"device": "cpu", "ops": ["layers.*.attn"]},
                                 "rest": {"device": "cpu", "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj",
                                                                   "layers.*.o_proj", "layers.*.mlp_norm",
                                                                   "layers.*.mlp", "layers.*.moe", "final_norm",
                                                                   "lm_head"]}},
                      "micro_batches": 2},
    "layers_streams2": {"stages": {"front": {"device": "cpu", "ops": ["embed", "layers.0.*", "layers.1.*"]},
                                   "back": {"device": "cpu", "ops": ["layers.2.*", "layers.3.*", "final_norm",
                                                                     "lm_head"]}},
                        "micro_batches": 2, "streams": True},
}


def tokens(outs):
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("name", list(SPECS))
def test_linear_attention_states_on_stages_match_colocated(qwen3_next, name):
    path, _ = qwen3_next
    colocated = _engine(path, **SMALL)
    prompts = _prompts(colocated.model_config.vocab_size)
    reference = tokens(colocated.generate(prompts, _params(), use_tqdm=False))
    assert colocated.scheduler.num_preemptions > 0, "the workload must exercise preemption"
    del colocated
    eng = _engine(path, stage_spec=SPECS[name], **SMALL)
    try:
        assert eng.runner.num_blocks == 14
        assert tokens(eng.generate(prompts, _params(), use_tqdm=False)) == reference
        if not SPECS[name].get("streams"):  # streams split max_num_seqs: one request each, no preemption
            assert eng.scheduler.num_preemptions > 0
        mem = eng.runner.stats()["memory"]
        holders = [s for s, m in mem.items() if m["state_bytes"] > 0]
        assert holders  # the stages that run Gated DeltaNet layers hold their states, nobody else
        assert sum(m["state_bytes"] for m in mem.values()) == 3 * STATE_SLOT
    finally:
        eng.shutdown()


def test_lightning_attention_states_on_stages_match_colocated(minimax):
    # MiniMax: Lightning (linear) and softmax layers, its attention ops on one stage
    path, _ = minimax
    colocated = minimax_engine(path)
    prompts = minimax_prompts(colocated.model_config.vocab_size)
    reference = tokens(colocated.generate(prompts, minimax_params(8), use_tqdm=False))
    del colocated
    spec = {"stages": {"attn": {"device": "cpu", "ops": ["layers.*.attn"]},
                       "rest": {"device": "cpu", "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj",
                                                         "layers.*.o_proj", "layers.*.mlp_norm", "layers.*.moe",
                                                         "final_norm", "lm_head"]}}}
    eng = minimax_engine(path, stage_spec=spec)
    try:
        assert tokens(eng.generate(prompts, minimax_params(8), use_tqdm=False)) == reference
        assert eng.runner.stats()["memory"]["attn"]["state_bytes"] > 0
    finally:
        eng.shutdown()
