"""`opdisagg_rt.bench_layers`: the per-layer context sweep runs on a tiny size and writes the
documented JSON and plot (structure only: tests assert behaviour, not timings), and its
window check really detects a read outside the window."""
from __future__ import annotations

import json

import pytest
import torch

from opdisagg_rt import bench_layers as bl

TINY = ["--hidden", "64", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
        "--window", "32", "--batch", "2", "--block-size", "4", "--contexts", "16,96",
        "--warmup", "1", "--repeats", "2", "--threads", "1", "--no-progress"]


def _tiny_cfg(**kw) -> bl.SweepConfig:
    base = {"hidden": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "window": 32,
            "batch": 2, "block_size": 4, "contexts": (16, 96), "warmup": 0, "repeats": 1,
            "dtype": "float32"}
    return bl.SweepConfig(**(base | kw))


def test_sweep_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "layers.json", tmp_path / "layers.png"
    res = bl.main(TINY + ["--full-layer", "--json", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    assert data["config"]["contexts"] == [16, 96] and data["config"]["hidden"] == 64
    assert list(data["results"]) == list(bl.ALL_TYPES) and data["skipped"] == {}
    for typ, r in data["results"].items():
        assert r["contexts"] == [16, 96], typ
        assert len(r["ms_per_token"]) == len(r["ms_per_step"]) == len(r["samples_ms"]) == 2
        assert all(len(s) == 2 for s in r["samples_ms"])
        assert all(t > 0 for t in r["ms_per_token"])
        assert r["ms_per_token"] == pytest.approx([m / 2 for m in r["ms_per_step"]])
        assert r["ratio_last_first"] == pytest.approx(r["ms_per_token"][1] / r["ms_per_token"][0])
        assert len(r["layer_ms_per_token"]) == 2  # --full-layer
    sliding = data["results"]["sliding"]
    # 96 > window 32: the early blocks are the (NaN) null block and the output stayed finite
    assert sliding["checks"]["reads_only_window"] == {"96": True}
    assert sliding["extra"][1]["live_blocks_per_seq"] < data["results"]["full"]["extra"][1][
        "live_blocks_per_seq"]
    assert sliding["ratio_last_window"] is None  # only one context at or past the window
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert res["results"].keys() == data["results"].keys()
    printed = capsys.readouterr().out
    assert "t(last)/t(first)" in printed and "full" in printed


def test_window_check_detects_reads_outside_the_window():
    """With the window dropped from the op, the decode reads the NaN null block: the check fails."""
    case = bl.softmax_case(_tiny_cfg(), 96, 32, torch.device("cpu"))
    assert case.check() == ("reads_only_window", True)
    case.op.window = None
    assert case.check() == ("reads_only_window", False)


@pytest.mark.parametrize("typ", ["lightning", "gdn"])
def test_linear_cases_run(typ):
    res = bl.run_sweep(_tiny_cfg(types=(typ,), contexts=(8, 40), full_layer=True), progress=False)
    assert not res["skipped"], res["skipped"]
    r = res["results"][typ]
    assert r["contexts"] == [8, 40] and all(t > 0 for t in r["ms_per_token"])
    assert all(t > 0 for t in r["layer_ms_per_token"])
    assert r["extra"][0]["state_bytes_per_seq"] > 0


@pytest.mark.parametrize("argv,match", [
    (["--num-kv-heads", "3"], "multiple of num_kv_heads"),
    (["--types", "full,bogus"], "bogus"),
    (["--batch", "0"], "batch must be >= 1"),
])
def test_bad_arguments_name_the_field(argv, match):
    with pytest.raises(ValueError, match=match):
        bl.main(TINY + argv)
