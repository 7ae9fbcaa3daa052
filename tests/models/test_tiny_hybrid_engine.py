"""The analysis framework's tiny hybrid (`opdisagg_rt/analysis/validate.py` TINY_HYBRID:
sliding-window + Gated DeltaNet + full attention layers, MoE with a gated shared expert) run
through the real engine as a Qwen3-Next-architecture checkpoint.

The checkpoint keeps TINY_HYBRID's `layer_types` pattern (["sliding_attention",
"linear_attention", "linear_attention", "full_attention"] x 2), its 16 experts / top-2 with a
shared expert, and its GDN shape ratios, scaled down (hidden 64, window 16 instead of 256) so the
test decodes far past the window in a few seconds.

transformers' Qwen3-Next has no sliding layers, so the reference is transformers'
`Qwen3NextForCausalLM` built with those layers as its full gated attention (same weights, eager
attention) and run with a per-layer-type mask dict (its forward accepts one): the sliding layers
get the standard sliding-window causal mask (key j visible to query i iff i - 16 < j <= i), the
full layers the causal mask, the GDN layers none. Compared: prefill logits of a 60-token prompt
(past the window) within 5e-4 abs (logits up to ~5.4, init scale 0.15; measured 2e-4, peaking at
positions 12-14, inside the window: float32 noise of 8 layers, amplified where a GDN head's output
is tiny before its RMS norm, not a window effect); a 12-token prompt (inside the window) also
against unmodified transformers with plain causal masks everywhere; greedy tokens identical for
24 steps alone and batched (prompts of 5, 23, 40 tokens, so decoding runs up to 48 tokens past
the window; top-1/top-2 margin >= 1e-3 checked); chunked prefill (7-token chunks) equal to
one-shot (tokens, and chosen-token logprobs within 1e-4); the engine's operation names equal the
analysis framework's op list for TINY_HYBRID (`ModelSpec.op_names()`), layer kind by layer kind
(sliding with its window / GDN / full; MoE with a shared expert, top-k), and every operation
holds exactly the parameter count the analysis framework costs for it (`analysis/ops.py`
`model_ops` on the scaled checkpoint's config).

Not compared: TINY_HYBRID itself has model_type "tiny_hybrid", for which the analysis framework
assumes no attention output gate and no q/k norm; run as Qwen3-Next the attention layers have
both, so the parameter check uses the checkpoint's own config (model_type qwen3_next).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdisagg_rt.analysis.models import parse_hf_config
from opdisagg_rt.analysis.ops import model_ops
from opdisagg_rt.analysis.validate import TINY_HYBRID
from opdisagg_rt.analysis.workload import Workload
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.gated_deltanet import GatedDeltaNetOp
from opdisagg_rt.layers.moe import MoEOp
from tests.models.test_qwen3_next import _engine, check_greedy, make_checkpoint, run_prefill, same

transformers = pytest.importorskip("transformers")

WINDOW = 16
STEPS = 24
TYPES = list(TINY_HYBRID["layer_types"])
HF_TYPES = ["full_attention" if t == "sliding_attention" else t for t in TYPES]


class MaskedHF:
    """transformers' model with sliding-window masks on the layers our config marks sliding."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids: torch.Tensor):
        n = ids.shape[1]
        i = torch.arange(n)
        causal = i[None, :] <= i[:, None]
        sliding = causal & (i[None, :] > i[:, None] - WINDOW)
        add = lambda m: torch.zeros(n, n).masked_fill(~m, float("-inf"))[None, None]
        masks = {"full_attention": add(causal), "sliding_attention": add(sliding), "linear_attention": None}
        return self.model(ids, attention_mask=masks, use_cache=False)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    extra = {"num_hidden_layers": len(TYPES), "mlp_only_layers": [], "num_experts": 16, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "linear_num_key_heads": 2,
             "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
             "sliding_window": WINDOW}
    path = make_checkpoint(tmp_path_factory.mktemp("tiny_hybrid") / "m", init=0.15, layer_types=TYPES, hf_layer_types=HF_TYPES,
                           extra=extra)
    cfg = json.loads(Path(path, "config.json").read_text())
    assert cfg["layer_types"] == TYPES and cfg["sliding_window"] == WINDOW
    plain_cfg = transformers.AutoConfig.from_pretrained(path)
    plain_cfg.layer_types = HF_TYPES  # build the sliding layers as (gated) attention layers
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, config=plain_cfg, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert all(hasattr(layer, "self_attn") for layer, t in zip(plain.model.layers, TYPES) if t != "linear_attention")
    masked_cfg = transformers.AutoConfig.from_pretrained(path)
    masked_cfg.layer_types = HF_TYPES
    masked = transformers.AutoModelForCausalLM.from_pretrained(path, config=masked_cfg, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    masked.config.layer_types = TYPES  # the forward now looks masks up by our layer types
    masked.model.config.layer_types = TYPES
    return path, plain, MaskedHF(masked)


def _prompts(vocab: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _params():
    from opdisagg_rt.sampling import SamplingParams
    return SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)


def test_ops_match_the_analysis_op_list(hybrid):
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.models.registry import build_model_ops
    ops = build_model_ops(load_model(hybrid[0]), torch.float32, 256)
    spec = parse_hf_config(TINY_HYBRID, "tiny-hybrid")
    assert [op.name for op in ops] == spec.op_names()
    by_name = {op.name: op for op in ops}
    for i, layer in enumerate(spec.layers):
        attn = by_name[f"layers.{i}.attn"]
        if layer.attn == "gdn":
            assert isinstance(attn, GatedDeltaNetOp)
        else:
            assert isinstance(attn, AttentionOp) and layer.attn in ("sliding", "full")
            assert attn.window == (WINDOW if layer.attn == "sliding" else None)
        assert isinstance(by_name[f"layers.{i}.moe"], MoEOp) and layer.moe
        assert by_name[f"layers.{i}.moe"].shared is not None and by_name[f"layers.{i}.moe"].top_k == spec.top_k
    # the parameters each operation holds are the ones the analysis framework costs for it
    # (the scaled checkpoint's own config: the same op list, its sizes)
    scaled = parse_hf_config(json.loads(Path(hybrid[0], "config.json").read_text()), "scaled")
    costs = {c.op: c.params for c in model_ops(scaled, Workload("decode", 1, [(16, 1)]), 4)}
    held = {op.name: sum(p.numel() for p in op.parameters().values()) for op in ops}
    assert held == costs


def test_prefill_logits_match_transformers(hybrid):
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.models.registry import build_model_ops
    path, plain, masked = hybrid
    loaded = load_model(path)
    ops = build_model_ops(loaded, torch.float32, 256)
    long, short = _prompts(loaded.config.vocab_size, [60, 12])
    got = run_prefill(ops, long)
    with torch.inference_mode():
        want = masked(torch.tensor([long])).logits[0]
        unwindowed = plain(torch.tensor([long])).logits[0]
    assert want.abs().max() > 1.0
    assert (got - want).abs().max() < 5e-4, float((got - want).abs().max())
    # the window matters past 16 tokens and not before
    assert (unwindowed[WINDOW:] - want[WINDOW:]).abs().max() > 1e-2
    assert (unwindowed[:WINDOW] - want[:WINDOW]).abs().max() < 1e-4
    got = run_prefill(build_model_ops(loaded, torch.float32, 256), short)
    with torch.inference_mode():
        want = plain(torch.tensor([short])).logits[0]
    assert (got - want).abs().max() < 5e-4


def test_greedy_alone_batched_and_chunked(hybrid):
    path, _, masked = hybrid
    engine = _engine(path)
    assert engine.runner.num_groups == 2  # full and sliding KV cache groups
    assert engine.runner.state_pool is not None
    prompts = _prompts(engine.model_config.vocab_size, [5, 23, 40])
    alone = [engine.generate([p], _params(), use_tqdm=False)[0] for p in prompts]
    check_greedy(masked, prompts, alone, STEPS)
    same(engine.generate(prompts, _params(), use_tqdm=False), alone)
    del engine
    chunked = _engine(path, max_num_batched_tokens=7)
    same(chunked.generate(prompts, _params(), use_tqdm=False), alone)
