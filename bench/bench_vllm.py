"""vLLM: seconds from ``LLM(...)`` to the first generated token, by weight loader.

One generated Llama (bf16, >= 1 GiB by default) in SeaweedFS and on local disk; one vLLM
process (``.venv-vllm``, CPU, in-process engine) runs, after a warm-up engine on a tiny
model that pays the process's one-time costs:

  safetensors        vLLM's default loader from local disk (files just written: page cache)
  tensorferry cold   --load-format tensorferry, the daemon fetching from SeaweedFS
  tensorferry attach a second engine: the model is resident, no GET
  runai_streamer     Run:ai Model Streamer from the same SeaweedFS (needs
                     `scripts/setup-vllm --bench`)

Also, for the cold load: the loader's time from the first tensor request to the last copy
into vLLM's parameters against the daemon's fetch time (Status), whose ratio is the goal
(at most 1.15x: the copy overlaps the fetch). JSON, and a PNG when matplotlib is there.

Usage: .venv/bin/python bench/bench_vllm.py [--hidden 2048] [--layers 12] [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.llamagen import write_llama
from tensorferry.devtools.seaweed import S3Server, run_seaweed

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINE = ROOT / "devtools" / "vllm_engine.py"
BUCKET = "bench"
LOADED = re.compile(
    r"tensorferry: (\d+) tensors \(([\d.]+) GB\) from \S+ into the model in ([\d.]+) s"
)


def upload(s3: S3Server, directory: Path, prefix: str) -> str:
    s3.create_bucket(BUCKET)
    client = s3.client()
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}/"


def engines(model: Path, tiny: Path, uri: str) -> list[dict[str, Any]]:
    def one(label: str, path: str, fmt: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"label": label, "model": path, "load_format": fmt, "extra": extra or {}}

    return [
        one("warm-up", str(tiny), "safetensors"),
        one("safetensors", str(model), "safetensors"),
        one("tensorferry cold", str(model), "tensorferry", {"uri": uri}),
        one("tensorferry attach", str(model), "tensorferry", {"uri": uri}),
        one("runai_streamer", uri.rstrip("/"), "runai_streamer"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tf-bench-vllm-", dir="/tmp"))
    model, tiny = work / "llama", work / "tiny"
    if not (model / "config.json").exists():
        t0 = time.monotonic()
        write_llama(model, hidden=args.hidden, layers=args.layers,
                    intermediate=args.intermediate, shard_mib=512)  # fmt: skip
        print(f"==> generated {model} in {time.monotonic() - t0:.1f} s", flush=True)
    if not (tiny / "config.json").exists():
        write_llama(tiny)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"==> model: {size / 2**30:.2f} GiB in {len(list(model.glob('*.safetensors')))} shards")
    with run_seaweed(work / "s3") as s3:
        uri = upload(s3, model, "llama")
        with daemon_subprocess(work, s3, [uri], log=work / "daemon.log") as daemon:
            spec = {"prompts": ["the quick brown fox"], "max_tokens": 4,
                    "engines": engines(model, tiny, uri)}  # fmt: skip
            (work / "spec.json").write_text(json.dumps(spec))
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                "TENSORFERRY_SOCKET": str(daemon.socket),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                # runai_streamer reads S3 itself, so this process gets the store's
                # credentials; the tensorferry loader never reads them.
                **s3.env(), "RUNAI_STREAMER_S3_ENDPOINT": s3.endpoint,
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
            }  # fmt: skip
            out = subprocess.run(
                [str(PYTHON), str(ENGINE), str(work / "spec.json"), str(work / "out.json")],
                env=env, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            (work / "engines.log").write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                raise SystemExit(f"engines failed; see {work / 'engines.log'}")
            with Client(daemon.socket) as client:
                loads = [r for r in client.status().recent_loads if r.outcome == "ready"]
    results = json.loads((work / "out.json").read_text())
    report = summarize(results, loads, out.stdout + out.stderr, size)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.png:
        draw(report, args.png)
    return 0


def summarize(
    results: list[dict[str, Any]], loads: list[Any], output: str, size: int
) -> dict[str, Any]:
    rows = {
        r["label"]: {"first_token_s": r.get("first_token_seconds"), "error": r.get("error", "")}
        for r in results if r["label"] != "warm-up"
    }  # fmt: skip
    tokens = {
        json.dumps(r.get("tokens")) for r in results if r["label"] != "warm-up" and "tokens" in r
    }
    copies = [float(m.group(3)) for m in LOADED.finditer(output)]
    fetch = loads[0].fetch_seconds if loads else None
    cold_load = copies[0] if copies else None
    return {
        "model_bytes": size,
        "engines": rows,
        "same_tokens": len(tokens) == 1,
        "cold": {
            "loader_seconds": cold_load,
            "daemon_fetch_seconds": fetch,
            "daemon_total_seconds": loads[0].total_seconds if loads else None,
            "ratio": (cold_load / fetch) if cold_load and fetch else None,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'loader':<20} {'LLM() to first token':>22}")
    for label, row in report["engines"].items():
        value = f"{row['first_token_s']:.2f} s" if row["first_token_s"] else row["error"][:60]
        print(f"{label:<20} {value:>22}")
    cold = report["cold"]
    if cold["ratio"]:
        print(
            f"\ncold load: weights into vLLM in {cold['loader_seconds']:.2f} s, daemon fetch "
            f"{cold['daemon_fetch_seconds']:.2f} s: {cold['ratio']:.2f}x (goal <= 1.15x)"
        )
    print(f"same greedy tokens from every loader: {report['same_tokens']}")


def draw(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: pip install 'tensorferry[bench]' for the PNG)")
        return
    rows = [(k, v["first_token_s"]) for k, v in report["engines"].items() if v["first_token_s"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([k for k, _ in rows], [v for _, v in rows], color="#4477aa")
    ax.set_xlabel("seconds from LLM(...) to the first token")
    ax.set_title(f"vLLM (CPU), {report['model_bytes'] / 2**30:.2f} GiB Llama")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
