"""KV-store workloads of `python -m opdisagg_rt.bench` (`--workload docqa|multiround`).

- docqa: `num_docs` documents of `doc_len` tokens, each asked `questions` short questions,
  question-major (every document's first question, then every second one, ...), so a repeat
  question arrives after the other documents have gone through the engine.
- multiround: `users` conversations; each round every user appends a turn to its history
  (prompt = history + new turn; the history includes the model's previous answers).

Requests run one at a time (a user waiting for an answer): TTFT is then prefill (or load) time,
not queueing. Both systems run with the in-engine prefix cache off, so every repeat either
loads from the store or recomputes: the comparison isolates the store.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch


def _tokens(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(1000, vocab, (n,), generator=g).tolist()


def docqa_requests(vocab: int, num_docs: int = 8, doc_len: int = 2048, questions: int = 4,
                   question_len: int = 24, seed: int = 0) -> list[tuple[list[int], bool]]:
    """(prompt, is_repeat) in arrival order."""
    g = torch.Generator().manual_seed(seed)
    docs = [_tokens(g, doc_len, vocab) for _ in range(num_docs)]
    qs = [[_tokens(g, question_len, vocab) for _ in range(questions)] for _ in range(num_docs)]
    return [(docs[d] + qs[d][q], q > 0) for q in range(questions) for d in range(num_docs)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100))


def _summary(ttft: list[float], repeat: list[bool], n_out: int, n_in: int, elapsed: float) -> dict:
    rep = [t for t, r in zip(ttft, repeat) if r]
    first = [t for t, r in zip(ttft, repeat) if not r]
    return {"ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "ttft_repeat_ms_p50": percentile(rep, 50), "ttft_repeat_ms_p99": percentile(rep, 99),
            "ttft_first_ms_p50": percentile(first, 50), "ttft_first_ms_p99": percentile(first, 99),
            "throughput_tok_s": n_out / elapsed, "total_tok_s": (n_out + n_in) / elapsed,
            "elapsed_s": elapsed, "num_requests": len(ttft), "output_tokens": n_out}


def _run_sequential(engine, prompts: list[tuple[list[int], bool]], output_len: int) -> tuple[dict, list]:
    from opdisagg_rt.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.generate([[1000 + i for i in range(8)]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    outs, start = [], time.perf_counter()
    for p, _ in prompts:
        outs.append(engine.generate([p], params, use_tqdm=False)[0])
    elapsed = time.perf_counter() - start
    ttft = [o.metrics.ttft * 1e3 for o in outs]
    res = _summary(ttft, [r for _, r in prompts], sum(len(o.token_ids) for o in outs),
                   sum(len(p) for p, _ in prompts), elapsed)
    return res, outs


def _run_multiround(engine, vocab: int, users: int, rounds: int, system_len: int, turn_len: int,
                    output_len: int, seed: int = 0) -> tuple[dict, list]:
    from opdisagg_rt.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.generate([[1000 + i for i in range(8)]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    g = torch.Generator().manual_seed(seed)
    hist = [_tokens(g, system_len, vocab) for _ in range(users)]
    turns = [[_tokens(g, turn_len, vocab) for _ in range(rounds)] for _ in range(users)]
    outs, repeat, n_in, start = [], [], 0, time.perf_counter()
    for r in range(rounds):
        for u in range(users):
            p = hist[u] + turns[u][r]
            o = engine.generate([p], params, use_tqdm=False)[0]
            hist[u] = p + o.token_ids  # the next turn continues the conversation
            outs.append(o)
            repeat.append(r > 0)
            n_in += len(p)
    elapsed = time.perf_counter() - start
    return _summary([o.metrics.ttft * 1e3 for o in outs], repeat, sum(len(o.token_ids) for o in outs),
                    n_in, elapsed), outs


def _store_metrics(engine, outs) -> dict:
    prompt = sum(o.metrics.num_prompt_tokens for o in outs)
    stored = sum(o.metrics.num_store_tokens for o in outs)
    s = engine.kv_connector.stats()
    return {"token_hit_rate": stored / prompt if prompt else 0.0, "tokens_from_store": stored,
            "tokens_from_prefix_cache": sum(o.metrics.num_cached_tokens for o in outs),
            "tokens_computed": sum(o.metrics.num_computed_prompt_tokens for o in outs),
            "chunk_hit_rate": s["chunk_hit_rate"], "load_gb_s": s["load_gb_s"], "store_gb_s": s["store_gb_s"],
            "store": s}


def run_system(loaded, args, kv_store: str | None) -> dict:
    from opdisagg_rt.engine import Engine
    kw = {}
    if kv_store is not None:
        kw = dict(kv_store=kv_store, kv_store_size=args.kv_store_size, kv_store_chunk_size=args.kv_store_chunk_size)
    engine = Engine(loaded, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_bytes,
                    enable_prefix_caching=False, **kw)
    vocab = loaded.config.vocab_size
    if args.workload == "docqa":
        reqs = docqa_requests(vocab, args.num_docs, args.doc_len, args.questions)
        res, outs = _run_sequential(engine, reqs, args.output_len)
    else:
        res, outs = _run_multiround(engine, vocab, args.users, args.rounds, args.system_len, args.turn_len,
                                    args.output_len)
    if kv_store is not None:
        engine.kv_connector.flush()
        res.update(_store_metrics(engine, outs))
    res["token_ids"] = [o.token_ids for o in outs]
    engine.shutdown()
    return res


def second_process(args, kv_store: str, vocab: int) -> dict:
    """A fresh engine process that never saw document 0 asks a new question about it."""
    g = torch.Generator().manual_seed(12345)
    doc = docqa_requests(vocab, args.num_docs, args.doc_len, args.questions)[0][0][:args.doc_len]
    prompt = doc + _tokens(g, 24, vocab)
    cfg = {"model": args.model, "dtype": args.dtype, "kv_store": kv_store, "chunk": args.kv_store_chunk_size,
           "output_len": args.output_len, "prompt": prompt}
    r = subprocess.run([sys.executable, "-m", "opdisagg_rt.bench_workloads"], input=json.dumps(cfg),
                       capture_output=True, text=True, timeout=900, env={**os.environ})
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _second_process_main() -> None:
    from opdisagg_rt.engine import Engine
    from opdisagg_rt.sampling import SamplingParams
    cfg = json.loads(sys.stdin.read())
    e = Engine(cfg["model"], dtype=cfg["dtype"], enable_prefix_caching=False, kv_cache_memory=256 << 20,
               kv_store=cfg["kv_store"], kv_store_chunk_size=cfg["chunk"])
    e.generate([[1000 + i for i in range(8)]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    o = e.generate([cfg["prompt"]], SamplingParams(temperature=0, max_tokens=cfg["output_len"], ignore_eos=True),
                   use_tqdm=False)[0]
    e.shutdown()
    print(json.dumps({"pid": os.getpid(), "ttft_ms": o.metrics.ttft * 1e3, "prompt_tokens": len(cfg["prompt"]),
                      "tokens_from_store": o.metrics.num_store_tokens, "error": o.error}))


def run(args, loaded) -> dict:
    stores = args.kv_store or []
    result = {"workload": {"name": args.workload, "dtype": args.dtype, "model": loaded.source,
                           "output_len": args.output_len, "threads": torch.get_num_threads(),
                           "kv_store_chunk_size": args.kv_store_chunk_size, "enable_prefix_caching": False,
                           "sequential": True, "load_avg_start": os.getloadavg()},
              "peers": {}}
    if args.workload == "docqa":
        result["workload"].update(num_docs=args.num_docs, doc_len=args.doc_len, questions=args.questions)
    else:
        result["workload"].update(users=args.users, rounds=args.rounds, system_len=args.system_len,
                                  turn_len=args.turn_len)
    systems = {f"kv-store={s}": s for s in stores} or {"engine": None}
    for i, (name, spec) in enumerate(systems.items()):
        res = run_system(loaded, args, spec)
        if i == 0:
            result["engine"] = {"name": name, **res}
        else:
            result["peers"][name] = res
        if spec is not None and spec.startswith("redis"):
            result.setdefault("second_process", {})[name] = second_process(args, spec, loaded.config.vocab_size)
    if "no-store" in args.compare:
        result["peers"]["no-store"] = run_system(loaded, args, None)
        base = result["peers"]["no-store"]
        for name, r in [(result["engine"]["name"], result["engine"]), *result["peers"].items()]:
            if name == "no-store":
                continue
            r["ttft_speedup"] = base["ttft_repeat_ms_p50"] / r["ttft_repeat_ms_p50"]
            r["identical_to_no_store"] = r["token_ids"] == base["token_ids"]
        result["ttft_speedup"] = result["engine"]["ttft_speedup"]
    for r in [result["engine"], *result["peers"].values()]:
        r.pop("token_ids", None)
    result["workload"]["load_avg_end"] = os.getloadavg()
    return result


def print_table(result: dict) -> None:
    rows = [(result["engine"]["name"], result["engine"])] + list(result["peers"].items())
    print(f"{'system':<40}{'TTFT p50':>9}{'p99':>8}{'rep p50':>9}{'rep p99':>9}{'first p50':>10}"
          f"{'out tok/s':>10}{'hit':>6}{'load GB/s':>10}{'store GB/s':>11}{'speedup':>8}")
    for name, r in rows:
        print(f"{name[:39]:<40}{r['ttft_ms_p50']:>9.1f}{r['ttft_ms_p99']:>8.1f}{r['ttft_repeat_ms_p50']:>9.1f}"
              f"{r['ttft_repeat_ms_p99']:>9.1f}{r['ttft_first_ms_p50']:>10.1f}{r['throughput_tok_s']:>10.1f}"
              f"{r.get('token_hit_rate', 0):>6.2f}{r.get('load_gb_s', 0):>10.2f}{r.get('store_gb_s', 0):>11.2f}"
              f"{r.get('ttft_speedup', float('nan')):>7.1f}x")
    for name, sp in result.get("second_process", {}).items():
        print(f"second process ({name}): {sp}")
    print(f"load average: {result['workload']['load_avg_start']} -> {result['workload']['load_avg_end']}")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(result["engine"]["name"], result["engine"])] + list(result["peers"].items())
    names = [n.replace("kv-store=", "") for n, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in [(axes[0], "ttft_repeat_ms_p50", "repeat-query TTFT p50 (ms, log)"),
                           (axes[1], "throughput_tok_s", "output tokens / s")]:
        vals = [r[key] for _, r in rows]
        ax.bar(names, vals, color=["tab:gray" if n == "no-store" else "tab:blue" for n in names])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        if key.startswith("ttft"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
    w = result["workload"]
    fig.suptitle(f"{w['name']} ({w['dtype']}), prefix cache off, sequential requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    _second_process_main()
