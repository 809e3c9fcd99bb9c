"""A daemon restart with models resident: adopted arenas (issue #28) against a cold restart.

One SeaweedFS on loopback behind a counting proxy, --models generated models of --size-mib
each. For each mode a daemon makes them resident (Preload), is killed (SIGKILL to its
process group, as systemd does on a crash; --how term: SIGTERM, a planned restart) and
started again with the same config and socket. Then:

  adopt  ([memory] adopt = true, the default): seconds from the new daemon's spawn until
         Status shows every model ready (adopted, nothing fetched)
  cold   ([memory] adopt = false, the behaviour before issue #28): seconds from the spawn
         until every model is resident again, loaded by one Preload per model at once
         as soon as the daemon answers

and in both, a fresh worker process (torch and the client imported, Client connected)
attaches each model --attaches times (wall time of Client.load, p50 and min), and the proxy
counts the data bytes fetched since the restart. GB = 1e9 bytes.

Usage: .venv/bin/python bench/bench_restart.py [--models 2] [--size-mib 256]
           [--attaches 10] [--runs 1] [--how kill|term] [--modes adopt,cold] [--quiet]
           [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tensorferry.client import Client
from tensorferry.devtools.daemon import kill_group, spawn_daemon, wait_serving, write_config
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server, run_seaweed

SHM = Path("/dev/shm")
MODES = ("adopt", "cold")
# Attaches in a warm worker: torch and the client imported, the channel connected by a
# first attach that is not counted.
WORKER = """
import gc, json, sys, time
import torch
from tensorferry.client import Client
socket, runs, uris = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
gc.collect()
out = {}
with Client(socket) as client:
    client.status()
    for uri in uris:
        walls, attached = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            model = client.load(uri)
            walls.append(time.perf_counter() - t0)
            attached.append(model.attached)
            model.close()
            del model
        out[uri] = {"wall": walls, "attached": attached}
print(json.dumps(out))
"""


class Bench:
    def __init__(self, work: Path, s3: S3Server, proxy: CountingProxy, quiet: bool) -> None:
        self.work, self.s3, self.proxy, self.quiet = work, s3, proxy, quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"    {text}", flush=True)

    @contextlib.contextmanager
    def daemon(self, run: Path, adopt: bool) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
        """A daemon on ``run / "tf.sock"`` (the same socket and config for each start in
        ``run``) and the monotonic time of its spawn; stopped with SIGTERM at the end."""
        extra = "" if adopt else "[memory]\nadopt = false\n"
        config = write_config(run, ["s3://bench/"], prelude="shutdown_grace = 0\n", extra=extra)
        env = {**os.environ, **self.s3.env(), "AWS_ENDPOINT_URL": self.proxy.endpoint}
        t0 = time.monotonic()
        proc = spawn_daemon(config, run / "tf.sock", env, log=run / "daemon.log")
        try:
            yield proc, t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    kill_group(proc)

    def attach(self, socket: Path, uris: list[str], runs: int) -> dict[str, list[float]]:
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(socket), str(runs + 1), *uris],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(out.stdout)
        walls: dict[str, list[float]] = {}
        for uri, r in result.items():
            if not all(r["attached"]):
                raise RuntimeError(f"{uri} was not resident: a load fetched it")
            walls[uri] = r["wall"][1:]  # the first one warmed the channel
        return walls

    def run(self, mode: str, uris: list[str], how: str, runs: int) -> dict[str, float]:
        adopt = mode == "adopt"
        run = Path(tempfile.mkdtemp(prefix=f"tf-restart-{mode}-", dir="/tmp"))
        instances: list[str] = []
        try:
            socket = run / "tf.sock"
            with self.daemon(run, adopt) as (proc, _):
                instances.append(wait_serving(proc, socket, log=run / "daemon.log").instance_id)
                with Client(socket) as client:
                    t0 = time.monotonic()
                    preload_all(client, uris)
                    self.say(f"{mode}: first loads {time.monotonic() - t0:.2f} s")
                if how == "kill":
                    kill_group(proc)
                else:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
            self.proxy.reset()
            with self.daemon(run, adopt) as (proc, t0):
                first = wait_serving(proc, socket, timeout=120, log=run / "daemon.log")
                serving = time.monotonic() - t0
                instances.append(first.instance_id)
                with Client(socket) as client:
                    if not adopt:
                        preload_all(client, uris)
                    status = client.status()
                    while sorted(m.uri for m in status.models if m.state == "ready") != uris:
                        if time.monotonic() - t0 > 120:
                            log = (run / "daemon.log").read_text(errors="replace")
                            raise RuntimeError(
                                f"not all resident 120 s after the spawn: {status.models}; "
                                f"the daemon's log:\n{log}"
                            )
                        time.sleep(0.005)
                        status = client.status()
                    resident = time.monotonic() - t0
                fetched = self.proxy.stats().body_bytes[Kind.DATA_GET]
                walls = self.attach(socket, uris, runs)
                self.say(f"{mode}: resident {resident:.3f} s after spawn, {fetched} data bytes")
                every = sorted(w for ws in walls.values() for w in ws)
                return {
                    "serving_s": serving, "resident_s": resident,
                    "adopted_models": first.adopted_models if adopt else status.adopted_models,
                    "adopted_bytes": first.adopted_bytes if adopt else status.adopted_bytes,
                    "data_bytes": fetched,
                    "data_bytes_after_attach": self.proxy.stats().body_bytes[Kind.DATA_GET],
                    "attach_p50_ms": statistics.median(every) * 1e3,
                    "attach_min_ms": every[0] * 1e3, "attach_max_ms": every[-1] * 1e3,
                }  # fmt: skip
        finally:
            for instance in instances:  # arenas a stop left for a next daemon that won't come
                for path in SHM.glob(f"tensorferry.{instance}.*"):
                    path.unlink(missing_ok=True)
            shutil.rmtree(run, ignore_errors=True)


def preload_all(client: Client, uris: list[str]) -> None:
    """One Preload per model, all at once (as workers asking together would)."""
    with concurrent.futures.ThreadPoolExecutor(len(uris)) as pool:
        for ready in pool.map(client.preload, uris):
            assert ready.model_id


def table(
    result: dict[str, dict[str, float]], models: int, size_mib: int, how: str, rounds: int
) -> None:
    rows = [
        ("spawn -> first Status answer (s)", "serving_s", "{:.2f}"),
        ("spawn -> all models resident (s)", "resident_s", "{:.2f}"),
        ("models adopted", "adopted_models", "{:.0f}"),
        ("bytes adopted (GB)", "adopted_bytes", "{:.3f}"),
        ("data bytes fetched after restart (GB)", "data_bytes", "{:.3f}"),
        ("attach p50 (ms)", "attach_p50_ms", "{:.1f}"),
        ("attach min (ms)", "attach_min_ms", "{:.1f}"),
        ("attach max (ms)", "attach_max_ms", "{:.1f}"),
    ]
    print(f"\nrestart ({'SIGKILL' if how == 'kill' else 'SIGTERM'}) with {models} x {size_mib} "
          f"MiB resident; medians of {rounds} rounds; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':<40}" + "".join(f"{m:>12}" for m in result))
    for label, key, fmt in rows:
        scale = 1e9 if key.endswith("bytes") else 1
        cells = "".join(f"{fmt.format(r[key] / scale):>12}" for r in result.values())
        print(f"{label:<40}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--attaches", type=int, default=10, help="per model, after one warm-up")
    parser.add_argument("--runs", type=int, default=1, help="rounds; the table shows medians")
    parser.add_argument("--how", choices=("kill", "term"), default="kill")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quiet", action="store_true", help="only the table and the JSON line")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="tf-bench-restart-", dir="/tmp") as tmp:
        work = Path(tmp)
        with run_seaweed(work / "seaweed") as s3:
            s3.create_bucket("bench")
            uris = []
            for i in range(args.models):
                directory = work / f"m{i}"
                write_model(directory, args.size_mib << 20, seed=i)
                for path in sorted(directory.iterdir()):
                    s3.client().upload_file(str(path), "bench", f"m{i}/{path.name}")
                uris.append(f"s3://bench/m{i}/")
            with CountingProxy(s3.endpoint) as proxy:
                bench = Bench(work, s3, proxy, args.quiet)
                # Interleaved rounds: a burst of other work on the machine hits each mode alike.
                for _ in range(args.runs):
                    for mode in modes:
                        runs[mode].append(bench.run(mode, sorted(uris), args.how, args.attaches))
    result = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    table(result, args.models, args.size_mib, args.how, args.runs)
    figures = {"models": args.models, "size_mib": args.size_mib, "how": args.how,
               "attaches": args.attaches, "runs": args.runs, "median": result,
               "each": runs}  # fmt: skip
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
