"""Roofline chart (each operation a point per device) and the per-op intensity plot of docs/analysis.md."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from opdisagg_rt.analysis.hardware import get_device  # noqa: E402
from opdisagg_rt.analysis.models import load_model  # noqa: E402
from opdisagg_rt.analysis.ops import model_ops  # noqa: E402
from opdisagg_rt.analysis.workload import Workload  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def _grouped(model, w: Workload, b: int) -> dict[str, list]:
    """Operations of the same role and layer kind cost the same: one point each (summed)."""
    out: dict[str, list] = {}
    for o in model_ops(model, w, b):
        key = o.op
        if key.startswith("layers."):
            i, role = key.split(".", 2)[1:]
            key = f"{role}[{model.layers[int(i)].attn}]"
        out.setdefault(key, []).append(o)
    return out


def roofline_chart(model_name: str, w: Workload, devices: list[str], out: str, dtype: str = "bf16",
                   hardware_file: str | None = None) -> dict:
    model = load_model(model_name)
    groups = _grouped(model, w, DTYPE_BYTES[dtype])
    fig, ax = plt.subplots(figsize=(9, 6))
    points, ridges = [], {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(devices):
        dev = get_device(name, hardware_file)
        c = colors[k % len(colors)]
        peak, bw = dev.peak(dtype), dev.mem_tbps * 1e12
        ridges[name] = peak / bw
        xs = [0.1, peak / bw, 1e5]
        ax.plot(xs, [min(peak, bw * x) for x in xs], color=c, lw=1.5, label=f"{name} roofline (ridge {peak / bw:.0f})")
        for g, ops in groups.items():
            F, B = sum(o.flops for o in ops), sum(o.bytes for o in ops)
            if not F or not B:
                continue
            times = [dev.op_time(o, dtype) for o in ops]
            t = sum(x[0] for x in times)
            points.append({"op": g, "device": name, "intensity": F / B, "flops_per_s": F / t, "bound": times[0][1]})
            ax.scatter(F / B, F / t, color=c, s=18, zorder=3)
            if k == 0:
                ax.annotate(g, (F / B, F / t), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel(f"predicted achieved {dtype} FLOP/s")
    ctx = ",".join(str(l) for l, _ in w.context)
    ax.set_title(f"{model.name}: {w.phase}, batch {w.batch}, context {ctx}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"out": out, "ridges": ridges, "points": points}


def intensity_plot(out: str, models: list[str], workloads: list[Workload], ridges_of: tuple[str, ...] = ("h100_sxm", "h20")) -> None:
    """Per-operation arithmetic intensity of several models vs the devices' ridge points."""
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 5.5), sharey=True)
    axes = list(axes) if len(workloads) > 1 else [axes]
    markers = "osD^v<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, w in zip(axes, workloads):
        labels: list[str] = []
        for k, name in enumerate(models):
            groups = _grouped(load_model(name), w, 2)
            for g, ops in groups.items():
                F, B = sum(o.flops for o in ops), sum(o.bytes for o in ops)
                if not F:
                    continue
                if g not in labels:
                    labels.append(g)
                ax.scatter(labels.index(g), F / B, marker=markers[k % len(markers)], color=colors[k % len(colors)], s=30,
                           label=name if g == list(groups)[1] else None)
        for d, ls in zip(ridges_of, ("--", ":")):
            r = get_device(d).ridge
            ax.axhline(r, ls=ls, color="k", lw=1)
            ax.text(len(labels) - 0.5, r * 1.1, f"{d} ridge {r:.0f}", ha="right", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{w.phase}, batch {w.batch}, context {w.context[0][0]}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("arithmetic intensity (FLOP/byte, bf16)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
