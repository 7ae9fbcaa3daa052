"""Hand-computed FLOPs and bytes of operations of real configs (bf16: 2 bytes, recurrent state fp32)."""
import pytest

from opdisagg_rt.analysis.models import load_model
from opdisagg_rt.analysis.ops import model_ops
from opdisagg_rt.analysis.workload import Workload


def op(model, w, name):
    return next(o for o in model_ops(load_model(model), w) if o.op == name)


def test_llama3_70b_decode_attention():
    # 64 query heads, 8 KV heads, head_dim 128, context 8192 (incl. the new token)
    o = op("llama-3-70b", Workload("decode", 1, [(8192, 1)]), "layers.0.attn")
    assert o.flops == 4 * 64 * 128 * 8192  # QK^T + PV, 2 FLOPs per multiply-add
    kv_tok = 2 * 8 * 128 * 2  # K and V, 8 KV heads: read once per KV head, not per query head
    assert o.state_bytes == 8191 * kv_tok + kv_tok  # read the cache, write the new token's K/V
    assert o.act_bytes == (64 * 128 * 2) * 2 + kv_tok  # q in, out, new k/v in
    assert o.intensity == pytest.approx(8.0, rel=0.01)  # ~ 64/8 query heads per KV head
    b = op("llama-3-70b", Workload("decode", 32, [(8192, 1)]), "layers.0.attn")
    assert b.flops == 32 * o.flops and b.bytes == 32 * o.bytes  # no KV sharing across sequences


def test_mistral_sliding_window_prefill():
    o = op("mistral-7b", Workload("prefill", 1, [(8192, 1)]), "layers.5.attn")
    pairs = 4096 * 4097 // 2 + (8192 - 4096) * 4096  # query j sees min(j, 4096) keys
    assert o.flops == 4 * 32 * 128 * pairs
    kv_tok = 2 * 8 * 128 * 2
    assert o.state_bytes == 8192 * kv_tok  # nothing cached yet: write only
    assert o.state_resident == 4096 * kv_tok  # cache bounded by the window
    # with 6000 tokens prefix-cached, the remaining queries see only the last 4095 cached keys
    p = op("mistral-7b", Workload("prefill", 1, [(8192, 1)], prefix=6000), "layers.5.attn")
    full = 4096 * 4097 // 2 + 4096 * 4096
    before = 4096 * 4097 // 2 + (6000 - 4096) * 4096
    assert p.flops == 4 * 32 * 128 * (full - before)
    assert p.state_bytes == (4095 + 2192) * kv_tok


def test_gated_deltanet_decode_step():
    # Qwen3-Next layer 0 is Gated DeltaNet: 16 key heads, 32 value heads, 128 x 128 state per value head
    o = op("qwen3-next-80b-a3b", Workload("decode", 1, [(4096, 1)]), "layers.0.attn")
    assert o.kind == "linear_attn"
    conv_dim = 2 * 16 * 128 + 32 * 128
    assert o.flops == 32 * 7 * 128 * 128 + 2 * conv_dim * 4  # decay, S^T k, rank-1 update, q^T S; conv
    state = 32 * 128 * 128 * 4
    assert o.state_bytes == 2 * state + 2 * conv_dim * 3 * 2  # read + write state and conv window
    assert o.state_resident == state + conv_dim * 3 * 2  # independent of context length
    long = op("qwen3-next-80b-a3b", Workload("decode", 1, [(262144, 1)]), "layers.0.attn")
    assert long.bytes == o.bytes


@pytest.mark.parametrize("batch", [1, 256])
def test_mixtral_moe_layer(batch):
    o = op("mixtral-8x7b", Workload("decode", batch, [(1024, 1)]), "layers.0.moe")
    h, inter, E, k = 4096, 14336, 8, 2
    expert = 3 * h * inter
    assert o.flops == 2 * batch * (h * E + k * expert)
    touched = E * (1 - (1 - k / E) ** batch)  # 2 at batch 1, ~8 at 256
    assert touched == pytest.approx(2 if batch == 1 else 8)
    assert o.weight_bytes == pytest.approx((h * E + touched * expert) * 2)
    assert o.act_bytes == 4 * batch * h * 2  # x in, out, residual read + write
    assert o.params == h * E + E * expert and o.active_params == h * E + k * expert


def test_batch256_moe_is_more_intense():
    a = op("mixtral-8x7b", Workload("decode", 1, [(1024, 1)]), "layers.0.moe")
    b = op("mixtral-8x7b", Workload("decode", 256, [(1024, 1)]), "layers.0.moe")
    assert b.intensity > 30 * a.intensity


def test_gemm_and_lm_head_rows():
    w = Workload("prefill", 2, [(100, 1)])
    ops = {o.op: o for o in model_ops(load_model("llama-3-8b"), w)}
    assert ops["layers.0.qkv_proj"].flops == 2 * 200 * 4096 * (4096 + 2 * 1024)
    assert ops["lm_head"].flops == 2 * 2 * 4096 * 128256  # logits only for each prompt's last token


def test_device_time_bounds():
    from opdisagg_rt.analysis.hardware import get_device
    h100 = get_device("h100_sxm")
    ops = {o.op: o for o in model_ops(load_model("llama-3-70b"), Workload("decode", 64, [(2048, 1)]))}
    assert h100.op_time(ops["layers.0.attn"])[1] == "memory"
    assert h100.op_time(ops["layers.0.mlp"])[1] == "memory"  # ~64 FLOP/B < H100 ridge (295 peak, ~246 effective)
    h20 = get_device("h20")
    assert h20.op_time(ops["layers.0.mlp"])[1] == "compute"  # H20 ridge is 37 FLOP/B
    t, _ = h100.op_time(ops["layers.0.attn"])
    assert t > ops["layers.0.attn"].bytes / 3.35e12  # never faster than the datasheet roofline
