"""Presets against published parameter counts; config parsing and its errors."""
import json

import pytest

from opdisagg_rt.analysis.models import ConfigError, load_model, parse_hf_config
from opdisagg_rt.analysis.ops import count_params
from opdisagg_rt.analysis.presets import PRESETS

CONVENTION = {"all": "active_with_embedding", "lm_head": "active", "non_embed": "active_non_embedding"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_published(name):
    m = load_model(name)
    c = count_params(m)
    pub = m.published
    assert c["total"] == pytest.approx(pub["total"], rel=0.01)
    if "active" not in pub:  # dense: every parameter is active
        assert c["active"] + (c["embedding"] if not m.tie_embeddings else 0) == c["total"]
        return
    got = c[CONVENTION[pub["active_counts"]]]
    if "active_rounding" in pub:  # vendor gives 1-2 significant digits ("3B", "37B"): inside the rounding interval
        assert abs(got - pub["active"]) <= pub["active_rounding"]
    else:
        assert got == pytest.approx(pub["active"], rel=0.01)


def test_layer_patterns():
    assert [l.attn for l in load_model("qwen3-next-80b-a3b").layers[:4]] == ["gdn", "gdn", "gdn", "full"]
    mm = load_model("minimax-text-01").layers
    assert [l.attn for l in mm[:8]] == ["lightning"] * 7 + ["full"] and all(l.moe for l in mm)
    g3 = load_model("gemma-3-27b").layers
    assert [l.attn for l in g3[:6]] == ["sliding"] * 5 + ["full"] and g3[0].window == 1024
    g2 = load_model("gemma-2-9b").layers
    assert [l.attn for l in g2[:2]] == ["sliding", "full"]
    ds = load_model("deepseek-v3").layers
    assert [l.moe for l in ds[:4]] == [False, False, False, True] and ds[0].attn == "mla"
    assert {l.window for l in load_model("mistral-7b").layers} == {4096}
    assert {l.attn for l in load_model("mixtral-8x7b").layers} == {"full"}


def test_op_names_follow_design():
    names = load_model("deepseek-v3").op_names()
    assert names[:3] == ["embed", "layers.0.attn_norm", "layers.0.qkv_proj"]
    assert "layers.0.mlp" in names and "layers.3.moe" in names and names[-2:] == ["final_norm", "lm_head"]


def test_config_file_and_errors(tmp_path):
    cfg = dict(PRESETS["llama-3-8b"]["config"])
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    assert count_params(load_model(str(tmp_path)))["total"] == count_params(load_model("llama-3-8b"))["total"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        parse_hf_config({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match=r"'layer_types\[1\]'.*'mamba'"):
        parse_hf_config({**cfg, "num_hidden_layers": 2, "layer_types": ["full_attention", "mamba"]})
    with pytest.raises(ConfigError, match="'layer_types'"):
        parse_hf_config({**cfg, "layer_types": ["full_attention"]})
    with pytest.raises(ConfigError, match="'sliding_window'"):
        parse_hf_config({**cfg, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]})
    with pytest.raises(ConfigError, match=r"'attn_type_list\[0\]'"):
        parse_hf_config({**cfg, "num_hidden_layers": 1, "attn_type_list": [2]})
    with pytest.raises(ConfigError, match="'num_experts_per_tok'"):
        parse_hf_config({**cfg, "num_local_experts": 4, "num_experts_per_tok": 8})
    with pytest.raises(ConfigError, match="'linear_num_key_heads'"):
        parse_hf_config({**cfg, "model_type": "qwen3_next", "num_hidden_layers": 1, "layer_types": ["linear_attention"]})
    with pytest.raises(ConfigError, match="'num_attention_heads'"):
        parse_hf_config({**cfg, "num_attention_heads": "32"})
    with pytest.raises(ValueError, match="unknown model"):
        load_model("no-such-model")


def test_multimodal_text_config():
    cfg = {"model_type": "gemma3", "text_config": PRESETS["gemma-3-27b"]["config"]}
    assert parse_hf_config(cfg).num_layers == 62
