"""Cold loads through an S3-like link: per-response first-byte latency with a tail, a
per-connection rate cap and (in one phase) stuck responses, in front of SeaweedFS.

All traffic goes through ONE CountingProxy (tensorferry.devtools.proxy) whose hook is
link_hook(LinkShape) (tensorferry.devtools.s3link); clients sign for the proxy's host. In order:

1. ceiling: curl with 8 MiB range GETs at each --parallel-max (default 32,64,128,256); the
   best median is "the ceiling".
2. tensorferry with its default [s3] settings (concurrency 32 growing to max_concurrency 256,
   hedging on): one warm-up, then --runs cold loads, each from a fresh worker, evicted after.
3. the same with stall_fraction/stall_seconds set (--stall): the loads alternate with those of
   step 2, so noise hits both alike. Status' recent_loads[].workers/.hedges say what each did.
4. Run:ai Model Streamer at --runai concurrencies, if runai_model_streamer imports.

The default link is chosen so that 32 connections reach at most a third of what the proxy
carries with 128-256 (the proxy, one Python event loop, is itself the ceiling on small
boxes): then matching the ceiling needs the load to grow past its starting concurrency.

GB = 1e9 bytes. Prints tables and targets, writes --json.

Usage: .venv/bin/python bench/bench_s3like.py [--size-mib 1024] [--shards 4] [--runs 2]
           [--link first_byte_ms=30,tail_ms=60,rate_mbps=1.5] [--stall ...]
           [--parallel 32,64,128,256] [--runai 16,32,64] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import _s3like
from _contenders import (
    Contenders,
    runai_available,
    shm_files,
    tensorferry_daemon,
    upload_model,
)
from _measure import Sample, summarize

from tensorferry.client import Client
from tensorferry.devtools.proxy import CountingProxy
from tensorferry.devtools.s3link import LinkHook, LinkShape, link_hook
from tensorferry.devtools.seaweed import run_seaweed

DEFAULT_LINK = "first_byte_ms=30,tail_ms=60,rate_mbps=1.5"
DEFAULT_STALL = "stall_fraction=0.01,stall_seconds=2"


def compact(shape: LinkShape) -> str:
    """``shape`` as LinkShape.parse reads it."""
    return ",".join(f"{f.name}={getattr(shape, f.name):g}" for f in dataclasses.fields(shape))


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def stalled_shape(base: LinkShape, text: str) -> LinkShape:
    """``base`` with the keys given in ``text`` (LinkShape.parse syntax) replaced."""
    given = {k.split("=")[0].strip() for k in text.split(",") if k.strip()}
    parsed = LinkShape.parse(text)
    return dataclasses.replace(base, **{k: getattr(parsed, k) for k in given})


def tf_run(
    c: Contenders, proxy: CountingProxy, hook: LinkHook, keys: list[str], nbytes: int
) -> Sample:
    """One cold tensorferry load with ``hook`` shaping the link."""
    proxy.set_fault(hook)
    proxy.reset()
    stalled0 = hook.stalled
    s = c.tensorferry(keys, nbytes)
    s.extra["stalled"] = hook.stalled - stalled0
    s.extra["data_gets"] = _s3like.data_gets(proxy)
    return s


def show(name: str, s: Sample) -> None:
    load = s.extra.get("daemon_load", {})
    more = f", workers {load.get('workers', 0)}, hedges {load.get('hedges', 0)}" if load else ""
    print(f"    {name:<26} {s.gbps:5.3f} GB/s, {s.seconds:6.2f} s{more}", flush=True)


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shape = LinkShape.parse(args.link)
    stall = stalled_shape(shape, args.stall)
    plain, stalls = link_hook(shape), link_hook(stall)
    runai = ints(args.runai)
    note = ""
    if runai and not runai_available():
        note = "Run:ai Model Streamer not installed (pip install -e '.[bench]'): skipped"
        print(f"==> {note}")
        runai = []
    result: dict[str, Any] = {}
    with run_seaweed(work / "seaweed") as s3:
        keys, nbytes = upload_model(work, s3, args.size_mib, args.shards)
        with CountingProxy(s3.endpoint, fault=plain) as proxy:
            # Every client (curl's presigned URLs, the daemon, Run:ai) signs for the proxy.
            via = dataclasses.replace(s3, endpoint=proxy.endpoint)
            env = {**os.environ, **via.env(), "TENSORFERRY_SOCKET": str(work / "tf.sock")}
            c = Contenders(via, env, work)
            print(f"==> ceiling: curl through the link ({compact(shape)})", flush=True)
            by_parallel: dict[str, list[Sample]] = {}
            for p in ints(args.parallel):
                for _ in range(args.runs):
                    s = c.ceiling(keys, nbytes, parallel=p)
                    by_parallel.setdefault(str(p), []).append(s)
                    show(f"curl --parallel-max {p}", s)
            ceiling = {p: summarize(v) for p, v in by_parallel.items()}
            ranges = by_parallel[next(iter(by_parallel))][0].extra["ranges"]
            with (
                tensorferry_daemon(work, via, args.size_mib + 64) as daemon,
                Client(env["TENSORFERRY_SOCKET"]) as tfc,
            ):
                c.daemon_pid, c.instance = daemon.pid, tfc.status().instance_id
                print("==> tensorferry, default [s3] settings", flush=True)
                warmup = tf_run(c, proxy, plain, keys, nbytes)
                show("warm-up (fresh arena)", warmup)
                runs: dict[str, list[Sample]] = {"tensorferry": [], "stalls": []}
                for i in range(args.runs):
                    for name, hook in (("tensorferry", plain), ("stalls", stalls)):
                        runs[name].append(s := tf_run(c, proxy, hook, keys, nbytes))
                        show(f"run {i + 1} {name}", s)
            proxy.set_fault(plain)
            runai_runs: dict[str, list[Sample]] = {}
            for n in runai:
                for _ in range(args.runs):
                    runai_runs.setdefault(str(n), []).append(s := c.runai(keys, nbytes, n))
                    show(f"runai concurrency {n}", s)
    if stray := shm_files(c.instance):
        raise RuntimeError(f"/dev/shm files left behind by the daemon: {stray}")
    result = {
        "config": {"size_mib": args.size_mib, "shards": args.shards, "runs": args.runs,
                   "object_bytes": nbytes, "ranges": ranges, "cpus": os.cpu_count(),
                   "link": compact(shape), "stall_link": compact(stall),
                   "daemon_instance": c.instance},
        "ceiling": {"by_parallel": ceiling,
                    "best_parallel": max(ceiling, key=lambda p: ceiling[p]["gbps_median"]),
                    "best_gbps": max(s["gbps_median"] for s in ceiling.values())},
        "tensorferry": _s3like.tf_summary(runs["tensorferry"]),
        "stalls": _s3like.tf_summary(runs["stalls"]),
        "warmup": warmup.as_dict(),
        "runai": {n: summarize(v) for n, v in runai_runs.items()},
        "runai_note": note,
        "runs": {
            **{f"curl-{p}": [s.as_dict() for s in v] for p, v in by_parallel.items()},
            **{name: [s.as_dict() for s in v] for name, v in runs.items()},
            **{f"runai-c{n}": [s.as_dict() for s in v] for n, v in runai_runs.items()},
        },
    }  # fmt: skip
    result["targets"] = _s3like.targets(result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--link", default=DEFAULT_LINK, help="LinkShape.parse keys")
    parser.add_argument("--stall", default=DEFAULT_STALL, help="keys changed for phase 3")
    parser.add_argument("--parallel", default="32,64,128,256", help="curl --parallel-max values")
    parser.add_argument("--runai", default="16,32,64", help="concurrencies; '' skips Run:ai")
    parser.add_argument("--workdir", type=Path, help="keep the model and S3 data here")
    parser.add_argument("--json", type=Path, default=Path("/tmp/bench_s3like.json"))
    args = parser.parse_args()
    try:
        stalled_shape(LinkShape.parse(args.link), args.stall)
    except ValueError as e:
        parser.error(str(e))
    if not ints(args.parallel) or args.runs < 1:
        parser.error("--parallel needs at least one value and --runs at least 1")
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-s3l-", dir="/tmp"))
            )
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        result = bench(args, work)
    _s3like.print_tables(result)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
