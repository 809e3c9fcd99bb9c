"""Fleet scale-out model: 10 to 1,000 hosts loading one model from S3 at once (issue #19).

A discrete-event model (SimPy), not a measurement: ``_fleet_model.py`` says what it models,
at what grain, and what it leaves out. Per scenario (``direct``: every host to S3;
``cache``: a cluster cache tier filled once from S3; ``p2p``: seed peers fetch from S3 and
peers re-serve pieces) and host count it prints and writes time-to-ready (from a host's
start until its model is resident: p50/p90/p99/max), origin GETs and bytes, 503 SlowDown
answers, loads that would have run out of retries, and the GETs in flight each host's
pacing controller settled on. First it runs one host through the S3-like link of
``docs/performance.md`` and prints the model beside what the daemon measured there.

JSON keys: ``params``, ``calibration`` (rows: ``reader``, ``model_s``, ``measured_s``),
``runs`` (rows: ``scenario``, ``hosts``, ``ready_s`` {p50, p90, p99, max}, ``origin_gets``,
``origin_bytes``, ``slowdowns``, ``failed_loads``, ``workers``, ``sim_s``, ``wall_s``,
``cdf_s``: every host's time, sorted), ``wall_s``.

Usage: .venv/bin/python bench/fleet_sim.py [--hosts 10,100,1000] [--scenarios direct,cache,p2p]
           [--model-gb 140] [--nic-gbps 200] [...: --help] [--json FILE] [--png FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from _fleet_inputs import Params
from _fleet_model import SCENARIOS, Fleet, Outcome

from tensorferry.daemon.fetch.link import ASSUMED

JSON_PATH = Path("/tmp/bench_fleet_sim.json")
PNG_PATH = "docs/fleet_sim.png"
#: docs/performance.md, "S3-like links" (2026-11-30): 1.07 GB, 8 MiB ranges, one proxy at
#: ~0.15 GB/s in all, 1.5 MB/s and a 30 ms median first byte per connection.
CALIBRATION_LINK = "first_byte_ms=30,tail_ms=60,rate_mbps=1.5"
CALIBRATION = (  # reader, GETs in flight at start, at most, seconds measured there
    ("curl, 32 in flight", 32, 32, 24.0),
    ("curl, 256 in flight", 256, 256, 7.2),
    ("tensorferry, default config", 32, 256, 7.5),
)


def calibrate() -> list[dict[str, Any]]:
    rows = []
    for reader, start, most, measured in CALIBRATION:
        # The bench's VM reports no NIC speed: the daemon assumed link.ASSUMED.
        p = Params(
            model_gb=1.07, s3_link=CALIBRATION_LINK, nic_gbps=0.15 * 8,
            link_gbps=ASSUMED * 8 / 1e9, concurrency=start, max_concurrency=most,
        )  # fmt: skip
        out = Fleet(p, "direct", 1).run()
        rows.append({"reader": reader, "model_s": round(float(out.ready[0]), 2),
                     "workers": out.workers, "measured_s": measured})  # fmt: skip
    return rows


def summary(out: Outcome, wall_s: float) -> dict[str, Any]:
    q = (round(float(v), 2) for v in np.quantile(out.ready, [0.5, 0.9, 0.99, 1.0]))
    return {
        "scenario": out.scenario,
        "hosts": out.hosts,
        "ready_s": dict(
            zip(("p50", "p90", "p99", "max"), (round(float(v), 2) for v in q), strict=True)
        ),
        "origin_gets": round(out.origin_gets),
        "origin_bytes": round(out.origin_bytes),
        "slowdowns": out.slowdowns,
        "failed_loads": out.failed_loads,
        "workers": out.workers,
        "sim_s": round(out.sim_s, 2),
        "wall_s": round(wall_s, 2),
        "cdf_s": [round(float(v), 3) for v in np.sort(out.ready)],
    }


def table(runs: list[dict[str, Any]]) -> None:
    print(
        f"\n{'scenario':<8} {'hosts':>5} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8} {'max s':>8} "
        f"{'origin GETs':>12} {'origin TB':>9} {'503s':>11} {'failed':>6} {'in flight':>9}"
    )
    for r in runs:
        t = r["ready_s"]
        print(
            f"{r['scenario']:<8} {r['hosts']:>5} {t['p50']:8.1f} {t['p90']:8.1f} "
            f"{t['p99']:8.1f} {t['max']:8.1f} {r['origin_gets']:>12,} "
            f"{r['origin_bytes'] / 1e12:9.2f} {r['slowdowns']:>11,} {r['failed_loads']:>6} "
            f"{r['workers']:>9.0f}"
        )


def chart(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    counts = sorted({r["hosts"] for r in runs})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 3.8), squeeze=False)
    for ax, hosts in zip(axes[0], counts, strict=True):
        for r in (r for r in runs if r["hosts"] == hosts):
            cdf = [r["cdf_s"][0], *r["cdf_s"]]
            share = np.arange(len(cdf)) / (len(cdf) - 1)
            ax.step(cdf, share, where="post", label=r["scenario"])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{hosts} hosts")
        ax.set_xlabel("time to ready, s (log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of hosts ready")
    axes[0][0].legend()
    fig.suptitle("Fleet model: time to ready per deployment (bench/fleet_sim.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", default="10,100,1000", help="host counts, comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-calibration", action="store_true", help="skip the one-host check")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--png", default=PNG_PATH, help="'' skips the chart")
    for f in dataclasses.fields(Params):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        parser.add_argument(flag, type=kind, default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    p = Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Params)})
    counts = [int(h) for h in args.hosts.split(",") if h.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    began = time.perf_counter()
    result: dict[str, Any] = {"params": dataclasses.asdict(p), "calibration": [], "runs": []}
    if not args.no_calibration:
        result["calibration"] = calibrate()
        print("one host through docs/performance.md's S3-like link (1.07 GB, 1.5 MB/s/conn):")
        for row in result["calibration"]:
            print(
                f"  {row['reader']:<28} model {row['model_s']:6.1f} s  measured "
                f"{row['measured_s']:5.1f} s  (settled at {row['workers']:.0f} in flight)"
            )
    for scenario in scenarios:
        for hosts in counts:
            t0 = time.perf_counter()
            out = Fleet(p, scenario, hosts, seed=args.seed).run()
            result["runs"].append(summary(out, time.perf_counter() - t0))
    table(result["runs"])
    result["wall_s"] = round(time.perf_counter() - began, 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nraw numbers: {args.json} ({result['wall_s']} s)")
    if args.png and importlib.util.find_spec("matplotlib") is None:
        print("no chart: matplotlib is not installed (.venv/bin/pip install -c constraints.txt "
              "-e '.[bench]')")  # fmt: skip
    elif args.png:
        chart(result["runs"], Path(args.png))
        print(f"chart: {args.png}")
    return result


if __name__ == "__main__":
    main()
