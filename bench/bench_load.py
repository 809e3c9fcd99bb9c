"""Cold-load benchmark: tensorferry against a curl ceiling, boto3 and Run:ai Model Streamer.

One SeaweedFS on loopback and generated models. For the main comparison (default 2 GiB in 4
shards) each contender gets a warm-up run, then --runs measured runs; rounds are interleaved
so that noise from other work on the machine hits every contender alike, and the tables show
medians. Then the scaling runs (tensorferry and the ceiling on each --scaling size), then the
warm-attach benchmark (bench_attach.py), then the rows with benches of their own (--rows:
HTTPS readers bench_tls.py, fetch workers bench_workers.py plain and https, a fresh
daemon's first load bench_fresh.py), each printing its table. The contenders are
described in bench/_contenders.py.

GB = 1e9 bytes. CPU-s/GB is the reader's CPU (curl; the daemon's process tree; the boto3 or
Run:ai worker); "server" is SeaweedFS's. Prints the tables, writes --json and draws --png.

Usage: .venv/bin/python bench/bench_load.py [--size-mib 2048] [--shards 4] [--runs 3]
           [--runai 4,8,16] [--scaling 1024,8192] [--attach-runs 50] [--device cpu]
           [--rows tls,workers,workers_tls,fresh]
           [--workdir DIR]
           [--json /tmp/bench_load.json] [--png /tmp/bench_load.png]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _report
from _contenders import Contenders, runai_available, shm_files, tensorferry_daemon, upload_model
from _measure import PeakMemory, Sample, summarize

from tensorferry.client import Client
from tensorferry.daemon.config.settings import DEFAULT_CHUNK_SIZE
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.devtools.seaweed import run_seaweed

HERE = Path(__file__).resolve().parent
ATTACH = HERE / "bench_attach.py"
#: The rows of issue 26 that have a bench of their own, run after the main comparison
#: (`--rows`), each a script that writes --json: name -> (script, its arguments).
ROWS = {
    "tls": ("bench_tls.py", []),
    "workers": ("bench_workers.py", []),
    "workers_tls": ("bench_workers.py", ["--tls"]),
    "fresh": ("bench_fresh.py", []),
}


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def ring_mib(device: str) -> int:
    """The daemon's pinned ring at its defaults: none on a CPU host."""
    if device == "cpu":
        return 0
    from tensorferry.daemon.fetch.link import link_rate
    from tensorferry.daemon.gpu.sizing import mem_total, ring_size

    cuda = CudaSettings()
    slot = cuda.slot_size or DEFAULT_CHUNK_SIZE
    return ring_size(cuda, slot, link_rate(0), 1, mem_total()).slots * slot >> 20


def rounds(
    contenders: dict[str, Callable[[], Sample]], runs: int
) -> tuple[dict[str, Sample], dict[str, list[Sample]]]:
    """A warm-up each, then ``runs`` interleaved rounds."""
    warmups: dict[str, Sample] = {}
    for name, fn in contenders.items():
        warmups[name] = s = fn()
        print(f"    warm-up {name:<14} {s.gbps:5.2f} GB/s, {s.seconds:5.2f} s", flush=True)
    measured: dict[str, list[Sample]] = {name: [] for name in contenders}
    for i in range(runs):
        for name, fn in contenders.items():
            measured[name].append(s := fn())
            print(f"    run {i + 1} {name:<16} {s.gbps:5.2f} GB/s", flush=True)
    return warmups, measured


def tensorferry_details(warmup: Sample, runs: list[Sample], idle: dict[str, int]) -> dict[str, Any]:
    keys = ("planSeconds", "firstByteSeconds", "fetchSeconds", "totalSeconds")
    median = {k: statistics.median(s.extra["daemon_load"].get(k, 0.0) for s in runs) for k in keys}
    median["worker_seconds"] = statistics.median(s.seconds for s in runs)
    for k in ("daemon_user_s", "daemon_system_s", "daemon_minflt"):
        median[k] = statistics.median(s.extra[k] for s in runs)
    peak = {k: max(s.extra["peak_kib"][k] for s in runs) for k in PeakMemory.FIELDS}
    return {"warmup": warmup.as_dict(), "median": median, "peak_kib": peak, "idle_kib": idle}


def scale(c: Contenders, models: dict[int, tuple[list[str], int]], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size_mib, (keys, nbytes) in models.items():
        print(f"==> scaling: {size_mib} MiB", flush=True)
        warm, measured = rounds(
            {"ceiling": partial(c.ceiling, keys, nbytes),
             "tensorferry": partial(c.tensorferry, keys, nbytes)}, runs,
        )  # fmt: skip
        tf = measured["tensorferry"]
        gib = tf[0].bytes / (1 << 30)
        out[str(size_mib)] = {
            **summarize(tf),
            "s_per_gib": statistics.median(s.seconds for s in tf) / gib,
            "first_s_per_gib": warm["tensorferry"].seconds / gib,
            "ceiling_gbps": summarize(measured["ceiling"])["gbps_median"],
            "peak_kib": {k: max(s.extra["peak_kib"][k] for s in tf) for k in PeakMemory.FIELDS},
            "runs": [s.as_dict() for s in tf],
        }
    return out


def bench(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, list[Sample]]]:
    runai = sizes(args.runai)
    if runai and not runai_available():
        print("==> Run:ai Model Streamer is not installed (pip install -e '.[bench]'): skipped")
        runai = []
    with run_seaweed(work / "seaweed") as s3:
        keys, nbytes = upload_model(work, s3, args.size_mib, args.shards)
        scaling = {mib: upload_model(work, s3, mib, args.shards) for mib in sizes(args.scaling)}
        env = {**os.environ, **s3.env(), "TENSORFERRY_SOCKET": str(work / "tf.sock"),
               "BENCH_DEVICE": args.device}  # fmt: skip
        c = Contenders(s3, env, work)
        recycle = max([args.size_mib, *scaling]) + 64
        with (
            tensorferry_daemon(work, s3, recycle) as daemon,
            Client(env["TENSORFERRY_SOCKET"]) as tfc,
        ):
            c.daemon_pid, c.instance = daemon.pid, tfc.status().instance_id
            idle = PeakMemory(daemon.pid)
            idle.sample()
            contenders: dict[str, Callable[[], Sample]] = {
                "ceiling": partial(c.ceiling, keys, nbytes),
                "tensorferry": partial(c.tensorferry, keys, nbytes),
                "boto3": partial(c.boto3, keys, nbytes),
            }  # fmt: skip
            for n in runai:
                contenders[f"runai-c{n}"] = partial(c.runai, keys, nbytes, n)
            print(f"==> cold loads of {nbytes / 1e9:.2f} GB", flush=True)
            warmups, runs = rounds(contenders, args.runs)
            scaled = scale(c, scaling, args.runs) if scaling else {}
    if stray := shm_files(c.instance):
        raise RuntimeError(f"/dev/shm files left behind by the daemon: {stray}")
    summary = {name: summarize(samples) for name, samples in runs.items()}
    return {
        "config": {"device": args.device, "size_mib": args.size_mib, "shards": args.shards,
                   "runs": args.runs, "object_bytes": nbytes, "cpus": os.cpu_count(),
                   "recycle_mib": recycle, "ring_mib": ring_mib(args.device),
                   "daemon_instance": c.instance},
        "summary": summary,
        "tensorferry": tensorferry_details(warmups["tensorferry"], runs["tensorferry"], idle.peak),
        "scaling": scaled,
        "warmups": {name: s.as_dict() for name, s in warmups.items()},
        "runs": {name: [s.as_dict() for s in samples] for name, samples in runs.items()},
    }, runs  # fmt: skip


def attach(runs: int, work: Path) -> dict[str, Any]:
    print(f"==> warm attach, {runs} fresh processes", flush=True)
    out = work / "attach.json"
    subprocess.run([sys.executable, str(ATTACH), "--runs", str(runs), "--json", str(out)],
                   check=True, timeout=1800)  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def row(name: str, work: Path) -> dict[str, Any]:
    script, extra = ROWS[name]
    print(f"==> {name}: {script} {' '.join(extra)}", flush=True)
    out = work / f"{name}.json"
    subprocess.run([sys.executable, str(HERE / script), *extra, "--json", str(out)],
                   check=True, timeout=3600)  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runai", default="4,8,16", help="concurrencies; '' skips Run:ai")
    parser.add_argument("--scaling", default="1024,8192", help="model sizes (MiB); '' skips")
    parser.add_argument("--attach-runs", type=int, default=50, help="0 skips warm attach")
    rows_help = f"the rows with benches of their own: {','.join(ROWS)}; '' skips"
    parser.add_argument("--rows", default=",".join(ROWS), help=rows_help)
    parser.add_argument("--device", default="cpu", help="where tensors land: cpu or cuda:N")
    parser.add_argument("--workdir", type=Path, help="keep models and S3 data here across runs")
    parser.add_argument("--json", type=Path, default=Path("/tmp/bench_load.json"))
    parser.add_argument("--png", default="/tmp/bench_load.png", help="'' skips the chart")
    args = parser.parse_args()
    if args.png and importlib.util.find_spec("matplotlib") is None:
        parser.error(
            "the chart needs matplotlib: .venv/bin/pip install -c constraints.txt -e '.[bench]' "
            "(or --png '' to skip it)"
        )
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-bench-", dir="/tmp"))
            )
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        result, runs = bench(args, work)
        if args.attach_runs:
            result["attach"] = attach(args.attach_runs, work)
        for name in filter(None, args.rows.split(",")):
            if name not in ROWS:
                parser.error(f"--rows: no row {name!r} (rows: {', '.join(ROWS)})")
            result[name] = row(name, work)
    _report.contenders_table(result["summary"])
    _report.tensorferry_lines(result["tensorferry"])
    if result["scaling"]:
        _report.scaling_table(result["scaling"])
    rows = _report.targets(result)
    _report.targets_table(rows)
    result["targets"] = [
        dict(zip(("what", "measured", "wanted", "met"), r, strict=True)) for r in rows
    ]
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nraw numbers: {args.json}")
    if args.png:
        _report.draw(runs, rows, Path(args.png))
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Everything is stopped by now: the finally blocks and context managers ran.
        sys.exit(130)
