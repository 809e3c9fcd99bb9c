"""The load benchmark's output: the contenders' table, the targets table, and the PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _measure import Sample, median_run

MIB = 1 << 20


def contenders_table(summary: dict[str, dict[str, float]]) -> None:
    ceiling = summary["ceiling"]["gbps_median"]
    print(
        f"\n{'contender':<12} {'GB/s':>6} {'min':>6} {'max':>6} {'CPU-s/GB':>9} "
        f"{'server CPU-s/GB':>16} {'x ceiling':>10}"
    )
    for name, s in summary.items():
        print(
            f"{name:<12} {s['gbps_median']:6.2f} {s['gbps_min']:6.2f} {s['gbps_max']:6.2f} "
            f"{s['cpu_s_per_gb']:9.2f} {s['server_cpu_s_per_gb']:16.2f} "
            f"{s['gbps_median'] / ceiling:10.2f}"
        )


def tensorferry_lines(tf: dict[str, Any]) -> None:
    w, m = tf["warmup"], tf["median"]
    peak, idle = tf["peak_kib"], tf["idle_kib"]
    print(
        f"\ntensorferry first (warm-up) load: {w['gbps']:.2f} GB/s, "
        f"{w['cpu_s'] / (w['bytes'] / 1e9):.2f} CPU-s/GB (the first arena this daemon fills)\n"
        f"daemon phases (median): plan {m['planSeconds']:.2f} s, first range done "
        f"{m['firstByteSeconds']:.2f} s, fetch {m['fetchSeconds']:.2f} s, total "
        f"{m['totalSeconds']:.2f} s; the worker sees {m['worker_seconds']:.2f} s\n"
        f"daemon CPU (median): user {m['daemon_user_s']:.2f} s, system "
        f"{m['daemon_system_s']:.2f} s, {m['daemon_minflt'] / 1e3:.0f}k minor page faults\n"
        f"daemon memory: peak RssAnon {peak['RssAnon'] / 1024:.0f} MiB (idle "
        f"{idle['RssAnon'] / 1024:.0f}), peak VmRSS {peak['VmRSS'] / 1024:.0f} MiB "
        f"(RssShmem {peak['RssShmem'] / 1024:.0f} MiB of it: the arena, shared with workers)"
    )


def scaling_table(scaling: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'model':>8} {'tf GB/s':>8} {'s/GiB':>6} {'first s/GiB':>12} {'ceiling GB/s':>13} "
          f"{'RssAnon MiB':>12} {'VmRSS MiB':>10}")  # fmt: skip
    for size, s in scaling.items():
        print(
            f"{size + ' MiB':>8} {s['gbps_median']:8.2f} {s['s_per_gib']:6.2f} "
            f"{s['first_s_per_gib']:12.2f} {s['ceiling_gbps']:13.2f} "
            f"{s['peak_kib']['RssAnon'] / 1024:12.0f} {s['peak_kib']['VmRSS'] / 1024:10.0f}"
        )


def targets(result: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for each of issue 9's figures this run measured."""
    s = result["summary"]
    tf = s["tensorferry"]["gbps_median"]
    rows: list[tuple[str, float, str, bool]] = []
    ratio = tf / s["ceiling"]["gbps_median"]
    rows.append(("cold load / ceiling", ratio, ">= 0.90", ratio >= 0.9))
    runai = {k: v for k, v in s.items() if k.startswith("runai")}
    if runai:
        best = max(runai, key=lambda k: runai[k]["gbps_median"])
        ratio = tf / runai[best]["gbps_median"]
        rows.append((f"cold load / Run:ai ({best})", ratio, ">= 2.0", ratio >= 2.0))
    ratio = tf / s["boto3"]["gbps_median"]
    rows.append(("cold load / boto3", ratio, ">= 2.5", ratio >= 2.5))
    cpu = s["tensorferry"]["cpu_s_per_gb"]
    rows.append(("daemon CPU-s/GB after warm-up", cpu, "<= 0.60", cpu <= 0.6))
    w = result["tensorferry"]["warmup"]
    rows.append(("daemon CPU-s/GB, first load", w["cpu_s"] / (w["bytes"] / 1e9), "(report)", True))
    if attach := result.get("attach"):
        rows.append(("warm attach p50 ms", attach["p50_ms"], "<= 20", attach["p50_ms"] <= 20))
        rows.append(("warm attach p99 ms", attach["p99_ms"], "<= 50", attach["p99_ms"] <= 50))
    if scaling := result.get("scaling"):
        small, large = scaling[min(scaling, key=int)], scaling[max(scaling, key=int)]
        anon = large["peak_kib"]["RssAnon"] / 1024
        bound = result["config"]["ring_mib"] + 200
        rows.append((f"peak RssAnon MiB at {max(scaling, key=int)} MiB", anon, f"<= {bound}",
                     anon <= bound))  # fmt: skip
        rows.append((f"peak VmRSS MiB at {max(scaling, key=int)} MiB",
                     large["peak_kib"]["VmRSS"] / 1024, "(report)", True))  # fmt: skip
        ratio = large["s_per_gib"] / small["s_per_gib"]
        rows.append(("s/GiB large / small model", ratio, "<= 1.20", ratio <= 1.2))
    return rows


def targets_table(rows: list[tuple[str, float, str, bool]]) -> None:
    print(f"\n{'target':<36} {'measured':>9} {'wanted':>9}  met")
    for what, value, wanted, met in rows:
        print(f"{what:<36} {value:9.2f} {wanted:>9}  {'yes' if met else 'NO'}")


def draw(
    runs: dict[str, list[Sample]], rows: list[tuple[str, float, str, bool]], path: Path
) -> None:
    """Throughput over time of each contender's median run, and the ratios against targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(3, 2))
    for name, samples in runs.items():
        run = median_run(samples)
        if run.rate:
            xs, ys = zip(*run.rate, strict=True)
            left.plot(xs, ys, label=f"{name} ({run.gbps:.2f} GB/s)", linewidth=1.4)
    left.set_xlabel("seconds since the load started")
    left.set_ylabel("GB/s (loopback bytes, scaled to the model)")
    left.set_title("Cold load, median run of each contender")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ratios = [(w, v, t) for w, v, t, _ in rows if w.startswith("cold load /")]
    names = [w.removeprefix("cold load / ") for w, _, _ in ratios]
    values = [v for _, v, _ in ratios]
    wanted = [float(t.split()[-1]) for _, _, t in ratios]
    colors = ["tab:green" if v >= t else "tab:red" for v, t in zip(values, wanted, strict=True)]
    bars = right.bar(names, values, color=colors)
    right.bar_label(bars, fmt="%.2fx")
    right.scatter(names, wanted, marker="_", s=900, color="black", label="target", zorder=3)
    right.set_title("tensorferry's GB/s as a multiple of each")
    right.tick_params(axis="x", labelsize=8)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
