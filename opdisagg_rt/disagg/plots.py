"""Per-step timeline of each stage: busy (coloured by micro-batch) and idle (blank) time."""
from __future__ import annotations


def timeline_window(traces: dict[str, list], last_s: float = 1.0,
                    window: tuple[float, float] | None = None) -> tuple[float, float]:
    """The `last_s` span plot_timeline draws: from the middle of `window` (a run's perf_counter
    span; default: of the traced units) where every stage's trace covers it: steady state, not the
    tail. (The traces keep each stage's last units: a many-visit spec's cover only the end of a
    long run.)"""
    if window is None:
        times = sorted(u[0] for tr in traces.values() for u in tr)
        start = times[len(times) // 2] - last_s / 2
    else:
        covered = max([window[0]] + [tr[0][0] for tr in traces.values()])
        start = max(covered, (covered + window[1]) / 2 - last_s / 2)
    return start, start + last_s


def plot_timeline(stats: dict, path: str, last_s: float = 1.0, window: tuple[float, float] | None = None) -> None:
    """Each stage's busy units over timeline_window(...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = {k: v["trace"] for k, v in stats["stages"].items() if v.get("trace")}
    start, end = timeline_window(stages, last_s, window)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(stages)))
    for row, (name, tr) in enumerate(stages.items()):
        units = [u for u in tr if u[1] >= start and u[0] <= end]
        ax.broken_barh([(u[0] - start, u[1] - u[0]) for u in units], (row - 0.35, 0.7),
                       facecolors=[colors[int(u[2]) % len(colors)] for u in units])
        ax.text(last_s, row, f" {name}", va="center")
    ax.set_yticks(range(len(stages)), list(stages))
    ax.set_xlabel("seconds (last window); colour = micro-batch / stream, blank = idle")
    ax.set_xlim(0, last_s * 1.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def trace_utilization(stats: dict, window: tuple[float, float] | None = None) -> dict[str, float]:
    """Busy fraction of each stage over `window` (a run's perf_counter span; its traced part), by
    default over the span every stage's trace covers (the traces keep each stage's last units,
    which may span several runs and the idle time between them)."""
    stages = {k: v["trace"] for k, v in stats["stages"].items() if v.get("trace")}
    if not stages:
        return {}
    start = max(tr[0][0] for tr in stages.values())
    end = min(tr[-1][1] for tr in stages.values())
    if window is not None:  # from where every trace covers it: a long run outlasts the traces' length
        start, end = max(start, window[0]), window[1]
    if end <= start:
        return {}
    return {name: sum(max(0.0, min(u[1], end) - max(u[0], start)) for u in tr) / (end - start)
            for name, tr in stages.items()}
