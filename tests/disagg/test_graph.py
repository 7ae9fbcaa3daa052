"""Stage specs and the stage graph, on operation declarations alone (no processes)."""
from __future__ import annotations

import json

import pytest
import torch

from opdisagg_rt.disagg.graph import DRIVER, build_graph
from opdisagg_rt.disagg.meta import decode_first_order, row_permutation, split_micro_batches
from opdisagg_rt.disagg.spec import StageSpecError, parse_stage_spec
from tests.disagg.conftest import ATTN_REST, llama_sigs

SIGS = llama_sigs(6)
NAMES = [s.name for s in SIGS]


def graph_of(spec):
    return build_graph(SIGS, parse_stage_spec(spec, NAMES).owner)


def test_spec_from_yaml_json_and_dict(tmp_path):
    import yaml
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(ATTN_REST))
    (tmp_path / "s.json").write_text(json.dumps(ATTN_REST))
    specs = [parse_stage_spec(src, NAMES) for src in (ATTN_REST, tmp_path / "s.yaml", str(tmp_path / "s.json"))]
    assert all(s.owner == specs[0].owner for s in specs)
    assert specs[0].stage("attn").ops == [f"layers.{i}.attn" for i in range(6)]
    assert specs[0].transport == "shm" and specs[0].micro_batches == 1


@pytest.mark.parametrize("stages, match", [
    ({"a": {"device": "cpu", "ops": ["embed", "layers.*.mlpp"]}}, "'layers.\\*.mlpp' matches no operation"),
    ({"a": {"device": "cpu", "ops": ["*"]}, "b": {"device": "cpu", "ops": ["layers.3.mlp"]}},
     "'layers.3.mlp' is claimed by stages 'a' and 'b'"),
    ({"a": {"device": "cpu", "ops": ["embed", "layers.*"]}}, r"'final_norm' \(and 1 more\) is not assigned"),
    ({"a": {"device": "tpu:0", "ops": ["*"]}}, "unknown device 'tpu:0'"),
    ({"a": {"device": "cuda:3", "ops": ["*"]}}, "needs CUDA"),
])
def test_spec_errors_name_the_culprit(stages, match):
    if "cuda" in match and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(StageSpecError, match=match):
        parse_stage_spec({"stages": stages}, NAMES)


def test_spec_errors_other():
    with pytest.raises(StageSpecError, match="not found"):
        parse_stage_spec("/nonexistent/spec.yaml", NAMES)
    with pytest.raises(StageSpecError, match="transport"):
        parse_stage_spec({**ATTN_REST, "transport": "carrier-pigeon"}, NAMES)
    with pytest.raises(StageSpecError, match="host 'node2'"):
        parse_stage_spec({"stages": {"a": {"device": "node2:cpu", "ops": ["*"]}}}, NAMES)
    assert parse_stage_spec({"stages": {"a": {"device": "node2:cpu", "ops": ["*"]}}, "transport": "dist"},
                            NAMES).stages[0].host == "node2"


def test_attention_vs_rest_moves_only_qkv_and_attn_out():
    g = graph_of(ATTN_REST)
    assert len(g.visits) == 2 * 6 + 1 and [v.stage for v in g.visits[:3]] == ["rest", "attn", "rest"]
    assert g.crossing() == {("rest", "attn"): {"q", "k", "v"}, ("attn", "rest"): {"attn_out"},
                            ("rest", DRIVER): {"logits"}}
    assert not any(v.keep for v in g.visits)  # the residual stays on `rest`


def test_every_third_mlp_elsewhere_is_multi_visit():
    third = [f"layers.{i}.mlp" for i in range(0, 6, 3)]
    spec = {"stages": {"main": {"device": "cpu", "ops": [n for n in NAMES if n not in third]},
                       "mlp": {"device": "cpu", "ops": third}}}
    g = graph_of(spec)
    assert [v.stage for v in g.visits] == ["main", "mlp", "main", "mlp", "main"]
    assert g.crossing() == {("main", "mlp"): {"hidden", "residual"}, ("mlp", "main"): {"residual"},
                            ("main", DRIVER): {"logits"}}
    assert len(g.visits_of("mlp")) == 2


def test_three_stages_and_residual_only_where_read():
    spec = {"stages": {"front": {"device": "cpu", "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj",
                                                          "layers.*.o_proj", "layers.*.mlp_norm"]},
                       "attn": {"device": "cpu", "ops": ["layers.*.attn"]},
                       "ffn": {"device": "cpu", "ops": ["layers.*.mlp", "final_norm", "lm_head"]}}}
    g = graph_of(spec)
    assert g.crossing()[("front", "attn")] == {"q", "k", "v"}
    assert g.crossing()[("attn", "front")] == {"attn_out"}
    assert g.crossing()[("front", "ffn")] == {"hidden", "residual"}
    assert g.crossing()[("ffn", "front")] == {"residual"}
    assert ("attn", "ffn") not in g.crossing()  # attention never sees the residual stream
    assert "residual" not in {n for m in g.messages() if "attn" in (m.src, m.dst) for n in m.names}
    slots = g.slots_needed(2)
    assert all(1 <= n <= 4 for n in slots.values())


def test_sliding_and_full_layers_placed_differently():
    sliding = [f"layers.{i}.attn" for i in range(0, 6, 2)]
    full = [f"layers.{i}.attn" for i in range(1, 6, 2)]
    spec = {"stages": {"dense": {"device": "cpu", "ops": [n for n in NAMES if n not in sliding + full]},
                       "swa": {"device": "cpu", "ops": sliding}, "full": {"device": "cpu", "ops": full}}}
    g = graph_of(spec)
    assert [v.stage for v in g.visits[:5]] == ["dense", "swa", "dense", "full", "dense"]
    assert g.crossing()[("dense", "swa")] == g.crossing()[("dense", "full")] == {"q", "k", "v"}


def test_single_stage_has_no_transfers():
    g = graph_of({"stages": {"all": {"device": "cpu", "ops": ["*"]}}})
    assert len(g.visits) == 1 and g.crossing() == {("all", DRIVER): {"logits"}}


def test_later_reader_on_same_stage_keeps_the_tensor():
    # `b` receives the residual at visit 1 and reads it again at visit 3 without anyone rewriting it
    from opdisagg_rt.disagg.graph import OpSig
    sigs = [OpSig("p", (), ("x", "y")), OpSig("q", ("y",), ("z",)), OpSig("r", ("z",), ("w",)),
            OpSig("s", ("x", "w"), ("logits",))]
    g = build_graph(sigs, {"p": "a", "q": "b", "r": "a", "s": "b"})
    assert [m.names for m in g.visits[1].recv] == [("y", "x")] and g.visits[1].keep == {"x"}
    assert [m.names for m in g.visits[3].recv] == [("w",)]


def test_micro_batch_split_is_contiguous_and_balanced():
    class S:
        def __init__(self, n):
            self.num_new_tokens = n
    reqs = [S(1)] * 6 + [S(40), S(10), S(30)]
    groups = split_micro_batches(reqs, 2)
    assert sum(groups, []) == reqs and len(groups) == 2
    assert abs(sum(s.num_new_tokens for s in groups[0]) - sum(s.num_new_tokens for s in groups[1])) <= 40
    assert split_micro_batches(reqs[:1], 2) == [reqs[:1]]


def test_decode_first_reorder_leaves_outputs_unchanged():
    """Rows of decodes first (what varlen / split decode-prefill kernels expect); applying the inverse
    permutation restores the original order, and a per-row computation commutes with it."""
    lens = [5, 1, 3, 1, 1, 4]
    perm, inv = decode_first_order(lens)
    assert [lens[i] for i in perm] == [1, 1, 1, 5, 3, 4]
    rows = row_permutation(lens, perm)
    x = torch.randn(sum(lens), 8)
    w = torch.randn(8, 8)
    reordered = (x[rows] @ w)
    back = torch.empty_like(reordered)
    back[rows] = reordered
    assert torch.equal(back, x @ w)
    assert torch.equal(perm[inv], torch.arange(len(lens)))
