"""Helpers of bench_s3like.py: the curl ceiling at a given parallelism, and the tables."""

from __future__ import annotations

import statistics
from typing import Any

from _measure import Sample

from tensorferry.devtools.proxy import CountingProxy, Kind


def data_gets(proxy: CountingProxy) -> int:
    return proxy.stats().requests[Kind.DATA_GET]


def tf_summary(runs: list[Sample]) -> dict[str, Any]:
    """Medians of tensorferry's runs, with what the daemon's Status said about each load."""
    loads = [s.extra["daemon_load"] for s in runs]
    return {
        "gbps_median": statistics.median(s.gbps for s in runs),
        "seconds_median": statistics.median(s.seconds for s in runs),
        "cpu_s_per_gb": statistics.median(s.cpu_per_gb for s in runs),
        "server_cpu_s_per_gb": statistics.median(s.server_cpu_s / (s.bytes / 1e9) for s in runs),
        # MessageToDict leaves out zero-valued fields.
        "workers": [int(r.get("workers", 0)) for r in loads],
        "hedges": [int(r.get("hedges", 0)) for r in loads],
        "retries": [int(r.get("retries", 0)) for r in loads],
        "stalled": [s.extra["stalled"] for s in runs],
        "data_gets": [s.extra["data_gets"] for s in runs],
    }


def print_tables(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\nlink: {cfg['link']}; {cfg['object_bytes'] / 1e9:.2f} GB in {cfg['ranges']} ranges")
    print(f"\n{'reader':<22} {'GB/s':>6} {'s':>6} {'CPU-s/GB':>9} {'server':>7} {'x ceiling':>10}")
    best = result["ceiling"]["best_gbps"]
    rows: list[tuple[str, dict[str, Any]]] = [
        (f"curl -Z {p}", s) for p, s in result["ceiling"]["by_parallel"].items()
    ]
    rows += [("tensorferry", result["tensorferry"]), ("tensorferry +stalls", result["stalls"])]
    rows += [(f"runai-c{n}", s) for n, s in result.get("runai", {}).items()]
    for name, s in rows:
        print(
            f"{name:<22} {s['gbps_median']:6.3f} {s['seconds_median']:6.2f} "
            f"{s['cpu_s_per_gb']:9.2f} {s['server_cpu_s_per_gb']:7.2f} "
            f"{s['gbps_median'] / best:10.2f}"
        )
    for name in ("tensorferry", "stalls"):
        s = result[name]
        print(
            f"{name:<12} per run: workers {s['workers']}, hedges {s['hedges']}, retries "
            f"{s['retries']}, stalled responses {s['stalled']}, range GETs {s['data_gets']}"
        )
    if note := result.get("runai_note"):
        print(note)
    print(f"\n{'target':<40} {'measured':>9} {'wanted':>9}  met")
    for t in result["targets"]:
        print(
            f"{t['what']:<40} {t['measured']:9.2f} {t['wanted']:>9}  {'yes' if t['met'] else 'NO'}"
        )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    c, tf, st = result["ceiling"], result["tensorferry"], result["stalls"]
    rows: list[tuple[str, float, str, bool]] = []
    ratio = tf["gbps_median"] / c["best_gbps"]
    rows.append(("tensorferry / best ceiling", ratio, ">= 0.90", ratio >= 0.9))
    # The goal is meaningful only when 32 in flight cannot get near the ceiling.
    low = c["by_parallel"].get("32", {}).get("gbps_median", 0.0) / c["best_gbps"]
    rows.append(("curl -Z 32 / best ceiling (link check)", low, "<= 0.34", low <= 0.34))
    slower = st["seconds_median"] / tf["seconds_median"]
    rows.append(("load time with stalls / without", slower, "<= 1.15", slower <= 1.15))
    hedged, stalled = sum(st["hedges"]), sum(st["stalled"])
    if stalled:  # a small model may draw no stalled response at all
        rows.append(("hedges with stalls (all runs)", hedged, "> 0", hedged > 0))
    if runai := result.get("runai"):
        best = max(s["gbps_median"] for s in runai.values())
        ratio = tf["gbps_median"] / best
        rows.append(("tensorferry / best Run:ai", ratio, "(report)", True))
    return [dict(zip(("what", "measured", "wanted", "met"), r, strict=True)) for r in rows]
