"""Per-step timeline of each stage: busy (coloured by micro-batch) and idle (blank) time."""
from __future__ import annotations


def plot_timeline(stats: dict, path: str, last_s: float = 1.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = {k: v["trace"] for k, v in stats["stages"].items() if v.get("trace")}
    end = max(u[1] for tr in stages.values() for u in tr)
    start = end - last_s
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(stages)))
    for row, (name, tr) in enumerate(stages.items()):
        units = [u for u in tr if u[1] >= start]
        ax.broken_barh([(u[0] - start, u[1] - u[0]) for u in units], (row - 0.35, 0.7),
                       facecolors=[colors[int(u[2]) % len(colors)] for u in units])
        busy = sum(min(u[1], end) - max(u[0], start) for u in units)
        ax.text(last_s, row, f" {100 * busy / last_s:.0f}% busy", va="center")
    ax.set_yticks(range(len(stages)), list(stages))
    ax.set_xlabel("seconds (last window); colour = micro-batch, blank = idle")
    ax.set_xlim(0, last_s * 1.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
