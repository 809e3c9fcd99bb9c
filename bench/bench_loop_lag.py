"""The daemon's event-loop lag while a model of many tensors loads (issue 25, defect 9).

A safetensors file of ``--tensors`` tiny tensors (a 20 MB header at 200,000) is written to
a local directory; a daemon serves it. A poller process calls Status every 5 ms and
records how long each answer took; the bench loads the model cold ``--runs`` times (each
load evicted after), while ``--burners`` processes spin on the other cores, as on a busy
host. Status does no work of its own beyond a few fields: its latency is the loop's lag
as a caller sees it. Printed: p50 / p99 / max of the Status latencies that overlapped a
load, and each load's time. The poller is a process of its own so that the bench's
worker, which decodes the tensor table, does not delay the poller's calls.

Usage: .venv/bin/python bench/bench_loop_lag.py [--tensors 200000] [--runs 3] [--burners 1]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess

POLLER = """
import json, sys, threading, time
from tensorferry.client import Client
samples = []
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
with Client(sys.argv[1]) as client:
    print("ready", flush=True)
    while not done.is_set():
        t0 = time.monotonic()
        client.status()
        samples.append((t0, time.monotonic() - t0))
        time.sleep(0.005)
print(json.dumps(samples))
"""
BURNER = "while True: pass"


def write_model(directory: Path, tensors: int) -> int:
    """One file of ``tensors`` F32 tensors of 4 elements, named like an MoE's experts."""
    directory.mkdir(parents=True)
    entries = []
    for i in range(tensors):
        name = f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w.weight"
        begin = 16 * i
        entries.append(f'"{name}":{{"dtype":"F32","shape":[4],"data_offsets":[{begin},'
                       f"{begin + 16}]}}")  # fmt: skip
    raw = ("{" + ",".join(entries) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(os.urandom(16 * tensors))
    return len(raw)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensors", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--burners", type=int, default=1, help="processes spinning meanwhile")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tf-lag-", dir="/tmp") as tmp:
        work = Path(tmp)
        header = write_model(work / "m", args.tensors)
        uri = str(work / "m") + "/"
        extra = f"[limits]\nmax_tensors = {max(args.tensors, 200_000)}\n"
        burners: list[subprocess.Popen[bytes]] = []
        with daemon_subprocess(work, None, [uri], extra_config=extra, log=work / "d.log") as d:
            poller = subprocess.Popen(
                [sys.executable, "-c", POLLER, str(d.socket)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                assert poller.stdout is not None
                assert poller.stdout.readline().strip() == "ready"
                burners = [subprocess.Popen([sys.executable, "-c", BURNER])
                           for _ in range(args.burners)]  # fmt: skip
                windows: list[tuple[float, float]] = []
                with Client(d.socket) as client:
                    for _ in range(args.runs):
                        t0 = time.monotonic()
                        with client.load(uri) as model:
                            assert len(model.tensors) == args.tensors
                        windows.append((t0, time.monotonic()))
                        client.evict(uri)
                        time.sleep(0.5)
            except BaseException:
                print((work / "d.log").read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
                out, _ = poller.communicate("", timeout=60)
    samples: list[tuple[float, float]] = json.loads(out) if out.strip().startswith("[") else []
    # A call that was in flight at any moment of a load overlapped it.
    during = [lag for t, lag in samples if any(t <= b and t + lag >= a for a, b in windows)]
    if not during:
        print("no Status answer overlapped a load", file=sys.stderr)
        return 1
    ms = [x * 1e3 for x in during]
    loads = [b - a for a, b in windows]
    p50, p99, worst = percentile(ms, 0.5), percentile(ms, 0.99), max(ms)
    print(f"{args.tensors} tensors (header {header / 1e6:.1f} MB), {args.burners} burner(s): "
          f"loads took {', '.join(f'{x:.2f}' for x in loads)} s")  # fmt: skip
    print(f"Status latency during the loads ({len(ms)} calls): p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms, max {worst:.1f} ms")  # fmt: skip
    if args.json:
        figures = {"tensors": args.tensors, "burners": args.burners, "loads_s": loads,
                   "p50_ms": p50, "p99_ms": p99, "max_ms": worst, "ms": ms}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
