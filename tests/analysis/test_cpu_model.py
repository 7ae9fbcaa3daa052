"""Calibration and validation on this CPU: they run, produce the documented shapes, and the
reference kernels agree with their recurrent forms. (Accuracy is a measured figure, reported by
`python -m opdisagg_rt.analyze validate`; timings are not asserted here.)"""
import json

import pytest
import torch

from opdisagg_rt.analysis import reference as R
from opdisagg_rt.analysis.calibrate import calibrate
from opdisagg_rt.analysis.hardware import cpu_device
from opdisagg_rt.analysis.validate import validate
from opdisagg_rt.analyze import main


def test_chunked_linear_attention_matches_recurrence():
    torch.manual_seed(0)
    B, H, n, dk, dv = 2, 3, 150, 16, 24
    q = torch.randn(B, H, n, dk) * 0.3
    k = torch.nn.functional.normalize(torch.randn(B, H, n, dk), dim=-1)
    v = torch.randn(B, H, n, dv)
    g, beta = -torch.rand(B, H, n) * 0.1, torch.rand(B, H, n)
    out, state = R.gdn_chunked(q, k, v, g, beta, chunk=32)
    s = torch.zeros(B, H, dk, dv)
    ref = torch.stack([R.gdn_decode(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], s) for t in range(n)], 2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, s, atol=1e-4, rtol=1e-4)
    decay = torch.tensor([0.9, 0.95, 0.99])
    v2 = torch.randn(B, H, n, dk)
    s = torch.zeros(B, H, dk, dk)
    ref = torch.stack([R.lightning_decode(q[:, :, t], k[:, :, t], v2[:, :, t], decay, s) for t in range(n)], 2)
    torch.testing.assert_close(R.lightning_chunked(q, k, v2, decay, chunk=32), ref, atol=1e-4, rtol=1e-4)


def test_attention_decode_reference_matches_sdpa():
    torch.manual_seed(0)
    B, H, Hkv, d, L = 2, 8, 2, 16, 40
    kc, vc = torch.randn(B, Hkv, L, d), torch.randn(B, Hkv, L, d)
    q, k, v = torch.randn(B, H, d), torch.randn(B, Hkv, d), torch.randn(B, Hkv, d)
    out = R.attn_decode(q, kc, vc, k, v, pos=30, window=8)
    kk, vv = kc[:, :, 23:31].repeat_interleave(4, 1), vc[:, :, 23:31].repeat_interleave(4, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv).reshape(B, H * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu") / "profile.json"
    prof = calibrate(out=path, quick=True, verbose=False)
    return path, prof


def test_calibrate_quick_writes_a_profile(quick_profile):
    path, prof = quick_profile
    d = json.loads(path.read_text())
    assert d["meta"]["format"] == 2 and d["meta"]["probe_us"] > 0 and d["gemm"]["bf16"]["log2_gflops"]
    assert {"gemm", "norm", "embed", "attn[full]", "attn_decode[full]", "linear_attn[gdn]", "linear_attn_decode[gdn]",
            "moe"} <= set(prof["curves"])
    assert prof["meta"]["threads"] == 1 and prof["samples"]
    dev = cpu_device(path)
    assert dev.name == "cpu" and dev.profile is not None
    assert torch.get_num_threads() >= 1  # thread count restored (no leak into other tests)


def test_validate_quick_json_shape(quick_profile, capsys):
    path, _ = quick_profile
    rep = validate(profile=path, quick=True, verbose=False)
    assert {"median_abs_err_pct", "p90_abs_err_pct", "ops"} <= set(rep)
    assert rep["median_abs_err_pct"] >= 0 and rep["p90_abs_err_pct"] >= rep["median_abs_err_pct"]
    ops = {r["op"] for r in rep["ops"]}
    assert "layers.*.attn [gdn]" in ops and "layers.*.moe [sliding]" in ops and "lm_head" in ops
    assert all(r["measured_us"] > 0 and r["predicted_us"] > 0 for r in rep["ops"])
    # the CLI prints the same shape
    assert main(["ops", "--model", "smollm2-135m", "--hardware", "h20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["op"] == "embed"
