"""The peers benchmark's outputs: the markdown table of results.md and the
``peers_<kind>.png`` plots of the metric against wall time."""

from __future__ import annotations

from pathlib import Path


def _fmt_time(r) -> str:
    if r["status"] != "ok":
        return r["status"]
    t = r["time_to_target_s"]
    shown = "not reached" if t is None else f"{t:.1f}"
    return f"{shown} ({r['reached']}/{r['repeats']})"


def _fmt_rel(value, ref) -> str:
    return "-" if value is None else f"{value / ref - 1:+.2%}"


def format_table(records: list[dict]) -> str:
    lines = [
        ("| problem | regime | method | time to target, s (repeats reaching it) | asgd / this | "
         "metric at budget vs optimum | final metric vs optimum | budget, s |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["problem"].startswith("efficiency"):
            continue
        ratio = "-" if r.get("asgd_over_this") is None else f"{r['asgd_over_this']:.2f}"
        if r["status"] != "ok":
            lines.append(f"| {r['problem']} | {r['regime']} | {r['method']} | {r['status']}: {r['reason']} | | | | |")
            continue
        lines.append(
            f"| {r['problem']} | {r['regime']} | {r['method']} | {_fmt_time(r)} | {ratio} | "
            f"{_fmt_rel(r['metric_at_budget'], r['reference_metric'])} | {_fmt_rel(r['final_metric'], r['reference_metric'])} | "
            f"{r['budget_s']:g} |"
        )
    eff = [r for r in records if r["problem"].startswith("efficiency")]
    if eff:
        lines += ["", ("| parallel efficiency | workers | 1-process samples/s | asgd samples/s | efficiency (median) | "
                      "no exchange (simuparallel) | bare loops side by side (no Dask) | repeats |"),
                  "|---|---|---|---|---|---|---|---|"]
        for r in eff:
            # Older results have no simuparallel column.
            alone = "-" if r.get("simuparallel_efficiency") is None else f"{r['simuparallel_efficiency']:.2f}"
            lines.append(f"| {r['kind']} {r['n_samples']:,}x{r['n_features']} | {r['n_workers']} | "
                         f"{r['single_process_samples_per_s']:,.0f} | {r['asgd_samples_per_s']:,.0f} | "
                         f"{r['final_metric']:.2f} ({', '.join(f'{v:.2f}' for v in r['final_metric_all'])}) | "
                         f"{alone} | {r['side_by_side']:.2f} | {r['repeats']} |")
        lines.append(f"No exchange: the same fit in `simuparallel` mode (no state messages), over the same baseline. "
                     f"Side by side: {eff[0]['n_workers']} bare single-process loops run at once in "
                     f"{eff[0]['n_workers']} processes, over {eff[0]['n_workers']} x one alone: "
                     "what the machine itself allows.")
    sizes = sorted({(r["problem"], r["n_samples"], r["n_features"], r["n_classes"]) for r in records
                    if not r["problem"].startswith("efficiency")})
    lines += ["", "Problems: " + "; ".join(f"{p} {n:,} x {f}, {c} {'clusters' if p.startswith('kmeans') else 'classes'}"
                                           for p, n, f, c in sizes) + ".",
              ("Target: 1% above the reference optimum; times are medians over the repeats, "
               "'not reached' when fewer than half reached it within the cost cap. "
               "asgd / this: asgd's median time to target over this method's (< 1: asgd is faster).")]
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> list[Path]:
    """``peers_<kind>.png``: metric above the optimum against wall time, a panel per problem and regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("kmeans", "logistic"):
        mine = [r for r in records if r["kind"] == kind and not r["problem"].startswith("efficiency")]
        panels = list(dict.fromkeys((r["problem"], r["regime"]) for r in mine))
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (problem, regime) in zip(axes[0], panels):
            rows = [r for r in mine if r["problem"] == problem and r["regime"] == regime]
            for i, r in enumerate(rows):
                if r["status"] != "ok":
                    ax.plot([], [], label=f"{r['method']} ({r['status']})", color=f"C{i}")
                    continue
                for j, points in enumerate(r["traces"]):
                    wall = [w for w, _ in points]
                    excess = [100 * (m / r["reference_metric"] - 1) for _, m in points]
                    ax.plot(wall, excess, marker=".", lw=1.5 if r["method"] == "asgd" else 1, alpha=0.8,
                            color=f"C{i}", label=r["method"] if j == 0 else None)
            ax.axhline(100 * (rows[0]["target_metric"] / rows[0]["reference_metric"] - 1), ls=":", color="grey", label="target")
            ax.axvline(rows[0]["budget_s"], ls="--", color="lightgrey")
            # Linear near the optimum (runs can end below it: the reference is the best of a
            # few restarts, not the global optimum), logarithmic above 0.1%.
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_xscale("log")
            # Major ticks only: within a decade or two matplotlib labels every minor tick, on top of each other.
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("wall time from the fit call (s)")
            ax.set_ylabel("metric above the reference optimum (%)")
            ax.set_title(f"{problem}, {regime}", fontsize=10)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"peers_{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
