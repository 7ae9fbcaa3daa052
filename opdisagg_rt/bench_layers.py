"""Per-layer decode cost against context length: one layer of each attention type.

    python -m opdisagg_rt.bench_layers --json layers.json --plot layers.png
    python -m opdisagg_rt.bench --layer-sweep ...          (same options, via main(argv))

For each context length, a batch of ``--batch`` sequences, each already holding that many
tokens of context, decodes one new token; the sweep times the `layers.{i}.attn` core (RoPE,
cache write and attention over the paged KV cache; or the linear-attention state update) with
warmup and the median of ``--repeats`` runs, and reports milliseconds per token (step time /
batch). ``--full-layer`` also times the projections around it (qkv_proj + attn + o_proj).

The plot (``--plot``) is log-log: context against ms per token, one line per type.

Layer types (sizes default to Qwen3-1.7B's attention: hidden 2048, 16 query heads of 128,
8 KV heads):

  full        softmax attention over the whole context (cost grows with context)
  sliding     the same with a window (``--window``, 1024): the KV cache holds only the blocks
              inside the window (the ones before it point at the null block, as the engine's
              sliding-window groups do), so the cost stops growing past the window. The sweep
              fills the null block with NaN: a finite output proves the kernel never read a key
              outside the window.
  lightning   MiniMax Lightning attention (decayed linear attention), 16 heads of 128: one
              float32 [H, 128, 128] state per sequence, flat in context
  gdn         Qwen3-Next Gated DeltaNet (short convolution + gated delta rule), flat in context

JSON (``--json``): ``config``, ``env``, ``skipped`` {type: reason} and ``results`` {type:
{contexts, ms_per_step, ms_per_token (medians), min_ms_per_token, samples_ms (every repeat),
layer_ms_per_token (--full-layer), checks, extra (bytes read or state size per sequence),
ratio_last_first (and ratio_last_window for sliding)}}. Timings on a shared machine are noisy:
the lead's figures come from a quiet one.

The issue's bar: t(8192) / t(256) under 1.3 for the linear layers. The ratio of the largest to
the smallest context is printed per type (and, for sliding, the ratio to the first context at or
past the window).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DEFAULT_CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
ALL_TYPES = ("full", "sliding", "lightning", "gdn")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(slots=True)
class SweepConfig:
    hidden: int = 2048
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    window: int = 1024
    batch: int = 8
    block_size: int = 16
    dtype: str = "bfloat16"
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    types: tuple[str, ...] = ALL_TYPES
    warmup: int = 3
    repeats: int = 20
    full_layer: bool = False
    device: str = "cpu"
    threads: int | None = None
    gdn_value_heads: int | None = None  # None: 2x the key heads, as Qwen3-Next
    gdn_conv_kernel: int = 4
    seed: int = 0

    def validate(self) -> None:
        for name in ("hidden", "num_heads", "num_kv_heads", "head_dim", "window", "batch",
                     "block_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {sorted(DTYPES)}")
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"contexts must be positive token counts, got {list(self.contexts)}")
        bad = [t for t in self.types if t not in ALL_TYPES]
        if bad or not self.types:
            raise ValueError(f"types {bad or '[]'} unknown: choose from {list(ALL_TYPES)}")


@dataclass(slots=True)
class Case:
    """One layer at one context: ``run`` does one decode step of the timed part; ``check``
    (optional) returns a named verdict recorded in the JSON."""
    run: Callable[[], object]
    proj: Callable[[], object] | None = None   # projections around the core (--full-layer)
    check: Callable[[], tuple[str, bool]] | None = None
    extra: dict = field(default_factory=dict)
    op: object | None = None  # the timed `attn` op


# ---- timing --------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---- the step batch ------------------------------------------------------------------------------

def decode_batch(batch: int, ctx: int, tables: torch.Tensor | None, block_size: int,
                 device: torch.device):
    """A StepBatch of ``batch`` decodes, each the token at position ``ctx - 1`` (context ``ctx``
    including it), KV blocks from ``tables`` [batch, ceil(ctx / block_size)] (None: no KV
    cache, slots -1), state slot r."""
    from opdisagg_rt.step_batch import StepBatch

    pos = torch.full((batch,), ctx - 1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    if tables is None:
        tables = torch.zeros(batch, 1, dtype=torch.long, device=device)
        slots = torch.full((batch,), -1, dtype=torch.long, device=device)
    else:
        slots = tables[rows, (ctx - 1) // block_size] * block_size + (ctx - 1) % block_size
    return StepBatch(
        request_ids=[f"r{i}" for i in range(batch)],
        input_ids=torch.zeros(batch, dtype=torch.long, device=device), positions=pos,
        slot_mapping=slots, query_start_loc=torch.arange(batch + 1, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.long, device=device),
        block_tables=tables, logits_indices=rows, num_decodes=batch,
        query_lens_list=[1] * batch, seq_lens_list=[ctx] * batch, block_size=block_size,
        state_indices=rows.clone())


def _fill_random(t: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> None:
    """Random values without drawing every element: one random tile copied over ``t`` (the
    sweep times memory traffic, not the values; drawing GBs of normals would dominate setup)."""
    flat = t.view(-1)
    tile = (torch.randn(min(flat.numel(), 1 << 20), generator=gen) * scale).to(t.dtype).to(t.device)
    for i in range(0, flat.numel(), tile.numel()):
        n = min(tile.numel(), flat.numel() - i)
        flat[i:i + n].copy_(tile[:n])


def _weight(out_f: int, in_f: int, dtype: torch.dtype, gen: torch.Generator,
            device: torch.device) -> torch.Tensor:
    return (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(dtype).to(device)


# ---- softmax attention (full / sliding) ------------------------------------------------------------

def softmax_case(cfg: SweepConfig, ctx: int, window: int | None, device: torch.device) -> Case:
    """`layers.{i}.attn` (AttentionOp) over a paged cache holding ``ctx`` tokens per sequence.

    Block 0 is the null block; with a window, table entries of blocks wholly before the window
    point at it (and it holds NaN), exactly the blocks the engine frees."""
    from opdisagg_rt.layers.attention import AttentionOp, OProjOp, QKVProjOp
    from opdisagg_rt.layers.rope import RotaryEmbedding

    dtype, bs, b = DTYPES[cfg.dtype], cfg.block_size, cfg.batch
    gen = torch.Generator().manual_seed(cfg.seed)
    nblk = -(-ctx // bs)
    # live blocks per sequence: all of them, or those from the window's first key's block on
    first_live = 0 if window is None else max(0, ctx - window) // bs
    live = nblk - first_live
    tables = torch.zeros(b, nblk, dtype=torch.long)
    tables[:, first_live:] = 1 + torch.arange(b * live).view(b, live)
    tables = tables.to(device)
    shape = (1 + b * live, bs, cfg.num_kv_heads, cfg.head_dim)
    k_cache = torch.empty(shape, dtype=dtype, device=device)
    v_cache = torch.empty(shape, dtype=dtype, device=device)
    _fill_random(k_cache, gen)
    _fill_random(v_cache, gen)
    k_cache[0].fill_(float("nan"))
    v_cache[0].fill_(float("nan"))

    rope = RotaryEmbedding(cfg.head_dim, ctx + 1, 1e6, None)
    rope.cos_sin_cache = rope.cos_sin_cache.to(device)
    name = "layers.0.attn"
    op = AttentionOp(name, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope, window=window)
    op.bind_cache(k_cache, v_cache)
    batch = decode_batch(b, ctx, tables, bs, device)
    q_w, kv_w = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = torch.randn(b, q_w + 2 * kv_w, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split((q_w, kv_w, kv_w), dim=-1)
    t: dict[str, torch.Tensor] = {}

    def run() -> torch.Tensor:
        # AttentionOp rotates q and k in place: give it fresh views each step, as a real step does
        t["q"], t["k"], t["v"] = q.clone(), k.clone(), v
        op.forward(t, batch)
        return t["attn_out"]

    proj = None
    if cfg.full_layer:
        qkv_op = QKVProjOp("layers.0.qkv_proj", _weight(q_w, cfg.hidden, dtype, gen, device),
                           _weight(kv_w, cfg.hidden, dtype, gen, device),
                           _weight(kv_w, cfg.hidden, dtype, gen, device))
        o_op = OProjOp("layers.0.o_proj", _weight(cfg.hidden, q_w, dtype, gen, device))
        hidden = torch.randn(b, cfg.hidden, generator=gen).to(dtype).to(device)
        attn_out = torch.randn(b, q_w, generator=gen).to(dtype).to(device)

        def proj() -> None:
            qkv_op.forward({"hidden": hidden}, batch)
            o_op.forward({"attn_out": attn_out, "residual": hidden}, batch)

    def check() -> tuple[str, bool]:
        return "reads_only_window", bool(torch.isfinite(run()).all())

    extra = {"kv_cache_bytes_read_per_seq": 2 * min(ctx, window or ctx) * cfg.num_kv_heads
             * cfg.head_dim * k_cache.element_size(), "live_blocks_per_seq": live}
    return Case(run, proj, check if window is not None and first_live > 0 else None, extra, op)


# ---- linear attention -------------------------------------------------------------------------------

def _bind_states(op, b: int, gen: torch.Generator, device: torch.device) -> None:
    """Bind a state pool of ``b`` slots holding random (already accumulated) states."""
    spec = op.state_spec()
    conv = torch.empty(b, *spec.conv_shape, dtype=spec.conv_dtype, device=device)
    rec = torch.empty(b, *spec.recurrent_shape, dtype=torch.float32, device=device)
    if conv.numel():
        _fill_random(conv, gen, 0.1)
    _fill_random(rec, gen, 0.01)
    op.bind_state(conv, rec)


def lightning_case(cfg: SweepConfig, ctx: int, device: torch.device) -> Case:
    """`layers.{i}.attn` of MiniMax (LightningAttentionOp): the state update of each sequence's
    [H, d, d] float32 state; the context length only sets the positions."""
    from opdisagg_rt.layers import lightning_attention as la

    dtype, b, h, d = DTYPES[cfg.dtype], cfg.batch, cfg.num_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    op = la.LightningAttentionOp("layers.0.attn", h, d, la.minimax_slopes(h, 0, 2), chunk_size=256)
    _bind_states(op, b, gen, device)
    batch = decode_batch(b, ctx, None, cfg.block_size, device)
    qkv = torch.nn.functional.silu(torch.randn(b, 3 * h * d, generator=gen)).to(dtype).to(device)
    t = dict(zip(("q", "k", "v"), qkv.split(h * d, dim=-1)))

    def run() -> torch.Tensor:
        op.forward(t, batch)
        return t["attn_out"]

    proj = None
    if cfg.full_layer:
        qkv_op = la.LightningQKVProjOp("layers.0.qkv_proj",
                                       _weight(3 * h * d, cfg.hidden, dtype, gen, device),
                                       _weight(h * d, cfg.hidden, dtype, gen, device), h, d)
        o_op = la.LightningOProjOp("layers.0.o_proj", _weight(cfg.hidden, h * d, dtype, gen, device),
                                   torch.ones(h * d, dtype=dtype, device=device))
        hidden = torch.randn(b, cfg.hidden, generator=gen).to(dtype).to(device)
        gate = torch.rand(b, h * d, generator=gen).to(dtype).to(device)
        attn_out = torch.randn(b, h * d, generator=gen).to(dtype).to(device)

        def proj() -> None:
            qkv_op.forward({"hidden": hidden}, batch)
            o_op.forward({"attn_out": attn_out, "gate": gate, "hidden": hidden}, batch)

    return Case(run, proj, extra={"state_bytes_per_seq": h * d * d * 4}, op=op)


def gdn_case(cfg: SweepConfig, ctx: int, device: torch.device) -> Case:
    """`layers.{i}.attn` of Qwen3-Next (GatedDeltaNetOp): short convolution, gates, the gated
    delta rule on each sequence's float32 [HV, d, d] state and the gated output norm; key heads
    ``--num-heads`` of ``--head-dim``, value heads ``--gdn-value-heads`` (default 2x, as
    Qwen3-Next: hidden 2048, 16 key and 32 value heads of 128)."""
    from opdisagg_rt.layers import gated_deltanet as gd
    from opdisagg_rt.layers.attention import OProjOp

    dtype, b, d = DTYPES[cfg.dtype], cfg.batch, cfg.head_dim
    hk = cfg.num_heads
    hv = cfg.gdn_value_heads or 2 * hk
    gen = torch.Generator().manual_seed(cfg.seed)
    conv_dim = 2 * hk * d + hv * d
    op = gd.GatedDeltaNetOp(
        "layers.0.attn", hk, hv, d, d,
        conv_weight=torch.randn(conv_dim, cfg.gdn_conv_kernel, generator=gen) * 0.5,
        A_log=torch.rand(hv, generator=gen).log(), dt_bias=torch.ones(hv),
        norm_weight=torch.ones(d, dtype=dtype, device=device), eps=1e-6)
    _bind_states(op, b, gen, device)
    batch = decode_batch(b, ctx, None, cfg.block_size, device)
    t = {"qkv": torch.randn(b, conv_dim, generator=gen).to(dtype).to(device),
         "z": torch.randn(b, hv * d, generator=gen).to(dtype).to(device),
         "ba": torch.randn(b, 2 * hv, generator=gen).to(dtype).to(device)}

    def run() -> torch.Tensor:
        op.forward(t, batch)
        return t["attn_out"]

    proj = None
    if cfg.full_layer:
        w = [_weight(n, cfg.hidden, dtype, gen, device)
             for n in (hk * d, hk * d, hv * d, hv * d, hv, hv)]
        in_op = gd.GDNInProjOp("layers.0.qkv_proj", *w)
        o_op = OProjOp("layers.0.o_proj", _weight(cfg.hidden, hv * d, dtype, gen, device))
        hidden = torch.randn(b, cfg.hidden, generator=gen).to(dtype).to(device)
        attn_out = torch.randn(b, hv * d, generator=gen).to(dtype).to(device)

        def proj() -> None:
            in_op.forward({"hidden": hidden}, batch)
            o_op.forward({"attn_out": attn_out, "residual": hidden}, batch)

    spec = op.state_spec()
    return Case(run, proj, extra={"state_bytes_per_seq": spec.nbytes(), "value_heads": hv}, op=op)


CASES: dict[str, Callable[[SweepConfig, int, torch.device], Case]] = {
    "full": lambda cfg, ctx, dev: softmax_case(cfg, ctx, None, dev),
    "sliding": lambda cfg, ctx, dev: softmax_case(cfg, ctx, cfg.window, dev),
    "lightning": lightning_case,
    "gdn": gdn_case,
}


# ---- the sweep ----------------------------------------------------------------------------------------

def _ratio(xs: list[float], ys: list[float], lo: int | None = None) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and (lo is None or x >= lo)]
    if len(pts) < 2:
        return None
    return pts[-1][1] / pts[0][1]


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Time every (type, context) pair; returns the JSON-ready result dict."""
    cfg.validate()
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from tqdm.auto import tqdm

    contexts = sorted(set(cfg.contexts))
    # context-major: a burst of machine noise then hits every type alike, not one curve
    pairs = [(t, c) for c in contexts for t in cfg.types]
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    bar = tqdm(pairs, desc="layer sweep", unit="case", disable=not progress)
    with torch.inference_mode():
        for typ, ctx in bar:
            if typ in skipped:
                continue
            bar.set_postfix_str(f"{typ} @ {ctx}")
            try:
                case = CASES[typ](cfg, ctx, device)
            except (ImportError, NotImplementedError) as e:
                skipped[typ] = f"{type(e).__name__}: {e}"
                continue
            r = results.setdefault(typ, {"contexts": [], "ms_per_step": [], "ms_per_token": [],
                                         "min_ms_per_token": [], "samples_ms": [], "checks": {},
                                         "extra": []})
            secs = time_fn(case.run, cfg.warmup, cfg.repeats, device)
            med = statistics.median(secs) * 1e3
            r["contexts"].append(ctx)
            r["ms_per_step"].append(med)
            r["ms_per_token"].append(med / cfg.batch)
            r["min_ms_per_token"].append(min(secs) * 1e3 / cfg.batch)
            r["samples_ms"].append([s * 1e3 for s in secs])
            r["extra"].append(case.extra)
            if case.proj is not None:
                psecs = time_fn(case.proj, cfg.warmup, cfg.repeats, device)
                pmed = statistics.median(psecs) * 1e3
                r.setdefault("layer_ms_per_token", []).append((med + pmed) / cfg.batch)
            if case.check is not None:
                name, ok = case.check()
                r["checks"].setdefault(name, {})[str(ctx)] = ok
            del case
    for typ, r in results.items():
        r["ratio_last_first"] = _ratio(r["contexts"], r["ms_per_token"])
        if typ == "sliding":
            r["ratio_last_window"] = _ratio(r["contexts"], r["ms_per_token"], cfg.window)
    return {"config": _config_dict(cfg), "results": results, "skipped": skipped,
            "env": {"torch": torch.__version__, "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}}


def _config_dict(cfg: SweepConfig) -> dict:
    d = {name: getattr(cfg, name) for name in cfg.__slots__}
    d["contexts"], d["types"] = list(cfg.contexts), list(cfg.types)
    return d


def format_table(res: dict) -> str:
    contexts = sorted({c for r in res["results"].values() for c in r["contexts"]})
    lines = ["ms per token (decode, batch {batch}, {dtype})".format(**res["config"]),
             f"{'type':<10}" + "".join(f"{c:>10}" for c in contexts) + f"{'t(last)/t(first)':>18}"]
    for typ, r in res["results"].items():
        by = dict(zip(r["contexts"], r["ms_per_token"]))
        cells = "".join(f"{by[c]:>10.4f}" if c in by else f"{'-':>10}" for c in contexts)
        ratio = r["ratio_last_first"]
        lines.append(f"{typ:<10}{cells}{ratio if ratio is None else format(ratio, '.2f'):>18}")
        if "layer_ms_per_token" in r:
            lb = dict(zip(r["contexts"], r["layer_ms_per_token"]))
            lines.append(f"{'  +proj':<10}" + "".join(
                f"{lb[c]:>10.4f}" if c in lb else f"{'-':>10}" for c in contexts))
    if "sliding" in res["results"] and res["results"]["sliding"].get("ratio_last_window"):
        s = res["results"]["sliding"]
        lines.append(f"sliding: t(last)/t(first context >= window {res['config']['window']}) = "
                     f"{s['ratio_last_window']:.2f}; reads only window blocks: "
                     f"{all(s['checks'].get('reads_only_window', {}).values())}")
    for typ, why in res["skipped"].items():
        lines.append(f"{typ}: skipped ({why})")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for typ, r in res["results"].items():
        ax.plot(r["contexts"], r["ms_per_token"], marker="o", label=typ)
    c = res["config"]
    if "sliding" in res["results"]:
        ax.axvline(c["window"], color="grey", ls=":", lw=1, label=f"window {c['window']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # the types differ by orders of magnitude; slopes read as scaling
    ticks = sorted({x for r in res["results"].values() for x in r["contexts"]})
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per token (attn core)")
    ax.set_title(f"decode, batch {c['batch']}, {c['dtype']}, hidden {c['hidden']}, "
                 f"{c['num_heads']}x{c['head_dim']} heads, {c['num_kv_heads']} KV heads", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def build_parser(prog: str = "python -m opdisagg_rt.bench_layers") -> argparse.ArgumentParser:
    d = SweepConfig()
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=_csv_ints, default=d.contexts, help="comma-separated")
    ap.add_argument("--types", default=",".join(d.types), help=f"comma-separated of {ALL_TYPES}")
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--num-heads", type=int, default=d.num_heads)
    ap.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--window", type=int, default=d.window)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--block-size", type=int, default=d.block_size)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--full-layer", action="store_true", help="also time qkv_proj + o_proj")
    ap.add_argument("--device", default=d.device,
                    help="cpu (tested here) or cuda (the dispatch's GPU path; untested here)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--gdn-value-heads", type=int, default=None,
                    help="Gated DeltaNet value heads (default: 2x --num-heads, as Qwen3-Next)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a PNG plot here")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m opdisagg_rt.bench_layers") -> dict:
    """Run the sweep from command-line arguments; print the table, write --json / --plot and
    return the result dict (``python -m opdisagg_rt.bench --layer-sweep`` forwards here)."""
    args = build_parser(prog).parse_args(argv)
    cfg = SweepConfig(
        hidden=args.hidden, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim, window=args.window, batch=args.batch, block_size=args.block_size,
        dtype=args.dtype, contexts=args.contexts,
        types=tuple(t.strip() for t in args.types.split(",") if t.strip()),
        warmup=args.warmup, repeats=args.repeats, full_layer=args.full_layer, device=args.device,
        threads=args.threads, gdn_value_heads=args.gdn_value_heads)
    t0 = time.perf_counter()
    res = run_sweep(cfg, progress=not args.no_progress)
    res["wall_seconds"] = time.perf_counter() - t0
    print(format_table(res))
    from opdisagg_rt.bench import save_results
    save_results(res, args.json, args.plot, plot)
    return res


if __name__ == "__main__":
    main()
