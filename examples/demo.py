"""The demo: SeaweedFS on loopback -> tensorferry daemon -> a separate worker process.

Writes a generated ~1 GiB model (4 shards + index, bf16/f16/f32/int8/fp8), uploads it,
starts the daemon with an allowlist, loads the model from a worker that checks every
tensor against safetensors.torch.load_file of the source, prints GB/s and the daemon's
CPU seconds per GB, then stops everything and checks nothing is left behind.

Usage: python examples/demo.py [--size-mib 1024] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import run_seaweed

HERE = Path(__file__).resolve().parent


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tf-demo-", dir="/tmp") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        step(f"writing a generated {args.size_mib} MiB model in {args.shards} shards")
        write_model(model_dir, args.size_mib << 20, shards=args.shards)
        step("starting SeaweedFS on loopback")
        with run_seaweed(work / "seaweed") as s3:
            s3.create_bucket("demo")
            client = s3.client()
            t0 = time.monotonic()
            for f in sorted(model_dir.iterdir()):
                client.upload_file(str(f), "demo", f"generated/{f.name}")
            step(f"uploaded to s3://demo/generated/ in {time.monotonic() - t0:.1f} s")
            uri = "s3://demo/generated/"
            step("starting the tensorferry daemon")
            with daemon_subprocess(work, s3, ["s3://demo/"]) as daemon:
                with Client(daemon.socket) as tf:
                    instance = tf.status().instance_id
                proc = psutil.Process(daemon.proc.pid)
                cpu0 = tree_cpu(proc)
                step(f"worker process loads {uri} and checks every tensor")
                out = subprocess.run(
                    [sys.executable, str(HERE / "worker.py"), uri, str(model_dir)],
                    env=daemon.env, capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                cpu = tree_cpu(proc) - cpu0
                if out.returncode != 0 and not out.stdout:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit("the worker failed")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                gb = result["bytes"] / 1e9
                print(
                    f"    {result['tensors']} tensors, {gb:.3f} GB in {result['seconds']:.2f} s "
                    f"= {result['gbps']:.2f} GB/s; daemon CPU {cpu:.2f} s = {cpu / gb:.2f} "
                    "CPU-s/GB"
                )
                if result["mismatches"]:
                    raise SystemExit(f"MISMATCH: {result['mismatches'][:5]}")
                print("    every tensor equals safetensors.torch.load_file of the source")
                subprocess.run(
                    [sys.executable, "-m", "tensorferry", "status"], env=daemon.env, check=False
                )
                step("stopping the daemon")
            step("stopping SeaweedFS")
    leftover = [p.name for p in Path("/dev/shm").glob(f"tensorferry.{instance}.*")]
    strays = [p.pid for p in psutil.process_iter(["cmdline"])
              if p.info["cmdline"] and "weed" in p.info["cmdline"][0] and str(work) in
              " ".join(p.info["cmdline"])]  # fmt: skip
    if leftover or strays or daemon.socket.exists():
        raise SystemExit(f"left behind: segments {leftover}, processes {strays}")
    step("done: no process, socket or /dev/shm segment left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
