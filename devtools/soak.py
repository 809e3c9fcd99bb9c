"""The chaos soak: workers loading, streaming, holding, releasing early, evicting and killing
themselves against one daemon, through a proxy that injects store faults, with the daemon
SIGKILLed and restarted once; every byte a worker is handed is compared with the source.

Usage: python -m tensorferry.devtools.soak [SECONDS] [--workers N] [--seed N] [--json]
(`scripts/soak` sets up and runs this). Exit status 0 only with zero mismatches, zero
unexpected errors, no leak, no model stuck `loading` and no worker past its deadline;
soak_report.py lists the errors it expects, and why.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from tensorferry.devtools.daemon import live_segments
from tensorferry.devtools.proxy import CountingProxy
from tensorferry.devtools.s3server import S3Server
from tensorferry.devtools.seaweed import run_seaweed
from tensorferry.devtools.soak_daemon import (
    Monitor,
    SoakDaemon,
    check_leftovers,
    check_processes,
    clean_env,
    settle,
)
from tensorferry.devtools.soak_pool import Options, Pool
from tensorferry.devtools.soak_report import STUCK, Report
from tensorferry.devtools.soak_setup import TARGETS, Injector, publish, write_models, write_plan

# The test and callers name these from here.
__all__ = ["Options", "Report", "main", "run"]


def supervise(pool: Pool, report: Report, kill_at: float | None) -> None:
    """Run the workers until the soak's end, respawning those that killed themselves;
    restart the daemon once at ``kill_at``."""
    # The first worker starts by killing itself mid-load, so every soak has one.
    slots = [pool.spawn("--first=die_loading")]
    slots += [pool.spawn() for _ in range(pool.opts.workers - 1)]
    try:
        while slots:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                kill_at = None
                restart(pool.daemon, report)
            for slot in list(slots):
                pool.watch(slot, report, now)
                if slot.proc.poll() is None:
                    continue
                pool.reap(slot, report)
                slots.remove(slot)
                if time.monotonic() < pool.until - 3:
                    slots.append(pool.spawn())
            time.sleep(0.2)
    finally:
        for slot in slots:  # only when the soak itself failed (the daemon did not restart)
            slot.overrun = True
            slot.proc.kill()
            pool.reap(slot, report)


def restart(daemon: SoakDaemon, report: Report) -> None:
    t0 = time.monotonic()
    left = daemon.kill()
    time.sleep(0.5)  # workers meet a dead socket
    old = daemon.instances[-1]
    status = daemon.start()
    report.adopted_models += status.adopted_models
    report.restart_gaps.append([t0, time.monotonic()])
    report.daemon_restarts += 1
    report.swept_segments += len(left)
    if unswept := live_segments(old):
        report.problems.append(f"leak: the restarted daemon did not sweep or adopt {unswept}")


def shutdown_check(pool: Pool, report: Report) -> None:
    """Two workers hold leases while the daemon stops (SIGTERM): each must be told
    "shutdown" and keep its bytes intact."""
    holders = [pool.spawn("--final-hold") for _ in range(2)]
    deadline = time.monotonic() + pool.opts.deadline
    while time.monotonic() < deadline:
        with pool.lock:
            holding = sum(1 for w, e in pool.events if e["ev"] == "holding" and
                          w in {h.index for h in holders})  # fmt: skip
        if holding == len(holders) or any(h.proc.poll() is not None for h in holders):
            break
        time.sleep(0.1)
    rc = pool.daemon.stop()
    if rc != 0:
        report.problems.append(f"the daemon exited with status {rc} on SIGTERM")
    for h in holders:
        try:
            h.proc.wait(120)
        except subprocess.TimeoutExpired:
            h.overrun = True
            h.proc.kill()
            report.problems.append(f"holder {h.index} did not see the daemon stop")
        pool.reap(h, report)
    with pool.lock:
        ends = [(w, s, e) for w, s, e in pool.ends if s["action"] == "final_hold"]
    for w, _, e in ends:
        if e["error"] is None and e.get("lease_end") != "shutdown":
            report.problems.append(
                f"holder {w}: its lease ended as {e.get('lease_end')!r} when the daemon stopped, "
                "not 'shutdown' (issue 25 defect 8)"
            )


def run(opts: Options, s3: S3Server | None = None, log: IO[str] = sys.stderr) -> Report:
    """The whole soak; ``s3``: a running server to use (else a SeaweedFS of its own)."""
    workdir = Path(tempfile.mkdtemp(prefix="tf-soak-", dir="/tmp"))
    report = Report(workers=opts.workers, seed=opts.seed, fault_rate=opts.fault_rate,
                    header_fault_rate=opts.header_fault_rate,
                    fault_targets=list(opts.fault_targets), workdir=str(workdir))  # fmt: skip
    rng = random.Random(opts.seed)

    def step(msg: str) -> None:
        print(f"soak: {msg}", file=log, flush=True)

    with contextlib.ExitStack() as stack:
        if s3 is None:
            step("starting SeaweedFS")
            s3 = stack.enter_context(run_seaweed(workdir / "seaweed"))
        step("writing and uploading the models")
        plan = publish(s3, write_models(workdir / "models"), f"{uuid.uuid4().hex[:8]}/")
        write_plan(workdir / "plan.json", plan)
        targets = frozenset(TARGETS[t] for t in opts.fault_targets)
        injector = Injector(opts.seed, opts.fault_rate, targets, opts.header_fault_rate)
        proxy = stack.enter_context(CountingProxy(s3.endpoint, fault=injector))
        env = clean_env({**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint})
        daemon = SoakDaemon(workdir, env, fetch_workers=opts.fetch_workers)
        daemon.start()
        monitor = Monitor(daemon, report, stuck_after=min(STUCK, opts.deadline))
        monitor.start()
        t0 = time.monotonic()
        until = t0 + opts.seconds
        kill_at = t0 + opts.seconds * rng.uniform(0.35, 0.65) if opts.restart else None
        pool = Pool(opts, daemon, workdir / "plan.json", until)
        step(f"{opts.workers} workers for {opts.seconds:.0f} s")
        try:
            supervise(pool, report, kill_at)
            report.seconds = time.monotonic() - t0
            monitor.stop.set()
            monitor.join()
            step("checking: no lease, no model loading, arenas")
            settle(daemon, report)
            step("stopping the daemon with two leases held")
            shutdown_check(pool, report)
        finally:
            monitor.stop.set()
            daemon.stop()
        for worker, start, end in pool.ends:
            report.add_end(worker, end, start["t"])
        check_leftovers(daemon, report)
        report.faults, report.faults_by_kind = injector.counts()
        report.requests = {k.value: n for k, n in proxy.stats().requests.items() if n}
    check_processes(report, workdir)
    if report.passed and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("seconds", nargs="?", type=float, default=60.0,
                        help="how long the workers run (default 60)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="seconds a load may wait (default 60)")  # fmt: skip
    parser.add_argument("--fault-rate", type=float, default=0.04, help="of data GETs")
    parser.add_argument("--header-fault-rate", type=float, default=0.15,
                        help="of header and index GETs (default 0.15)")  # fmt: skip
    parser.add_argument("--faults", default="data,header,object",
                        help="GETs to fault: data (ranges), header (headers and the index: "
                        "small ranges from byte 0), object (GETs without a Range)")  # fmt: skip
    parser.add_argument("--no-restart", action="store_true", help="never kill the daemon")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fetch-workers", type=int, default=None,
                        help="the daemon's [fetch] workers (default: its own default)")  # fmt: skip
    args = parser.parse_args(argv)
    opts = Options(
        seconds=args.seconds, workers=args.workers, seed=args.seed, deadline=args.deadline,
        fault_rate=args.fault_rate, header_fault_rate=args.header_fault_rate,
        fault_targets=tuple(args.faults.split(",")), restart=not args.no_restart, keep=args.keep,
        fetch_workers=args.fetch_workers,
    )  # fmt: skip
    report = run(opts)
    print(report.dumps() if args.json else report.summary(), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
