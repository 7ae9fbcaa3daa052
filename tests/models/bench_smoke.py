"""`python -m opdisagg_rt.bench --model DIR` on a tiny checkpoint (issue 5: the bench runs any of
the seven families): a short run must finish every request with all its tokens."""
from __future__ import annotations


def check_bench_runs(path: str) -> dict:
    from opdisagg_rt import bench
    r = bench.main(["--model", path, "--num-requests", "3", "--input-len", "12", "--output-len", "4",
                    "--dtype", "float32", "--max-num-seqs", "4"])
    assert r["engine"]["output_tokens"] == 3 * 4, r["engine"]
    assert r["engine"]["throughput_tok_s"] > 0
    return r
