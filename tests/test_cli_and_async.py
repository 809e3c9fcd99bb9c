"""The CLI a scale-out hook runs, Release, and the asyncio client."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tensorferry.client import AsyncClient
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import Daemon, assert_same_tensors, upload


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorferry", *args, "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_preload_wait_ls_load_evict_status(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    pre = cli(daemon, "preload", uri, "--wait", "-q")
    assert pre.returncode == 0, pre.stderr
    assert pre.stdout.startswith("resident: m")
    ls = cli(daemon, "ls")
    assert "\tready\t" in ls.stdout
    assert uri in ls.stdout
    assert "0 leases" in ls.stdout
    load = cli(daemon, "load", uri, "-q")
    assert load.returncode == 0, load.stderr
    assert load.stdout.startswith("attached to resident model m")
    status = cli(daemon, "status")
    assert "load attached" in status.stdout
    assert "load ready" in status.stdout
    evict = cli(daemon, "evict", uri)
    assert evict.stdout.strip().endswith("; 0 leases still open")
    assert cli(daemon, "ls").stdout.strip() == "no resident models"
    missing = cli(daemon, "evict", uri)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"tensorferry evict: no resident model '{uri}'; `tensorferry ls` lists model ids and URIs"
    )


def test_files_writes_what_vllm_reads_from_the_daemon(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    src = tmp_path / "m"
    write_model(src, 1 << 20, shards=2, layer_bytes=1 << 18)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "notes.txt").write_text("not for vLLM")
    uri = upload(s3, src, prefix)
    dest = tmp_path / "serve"
    done = cli(daemon, "files", uri, str(dest))
    assert done.returncode == 0, done.stderr
    names = ["config.json", "tokenizer.json", "model.safetensors.index.json"]
    assert done.stdout.strip() == f"{dest}: {', '.join(names)}"
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    for name in names:
        assert (dest / name).read_bytes() == (src / name).read_bytes(), name
    (src / "config.json").unlink()
    bare = upload(s3, src, prefix.rstrip("/") + "-bare/")
    refused = cli(daemon, "files", bare, str(tmp_path / "bare"))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"tensorferry files: {bare} has no config.json; vLLM needs the model's config beside "
        "its weights"
    )


def test_release_ends_the_lease_while_views_live(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    with daemon.client() as client:
        model = client.load(uri)
        assert client.list()[0].leases == 1
        assert client.release(model.lease_id) is True
        deadline = time.monotonic() + 10
        while client.list()[0].leases and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.list()[0].leases == 0
        assert client.release(model.lease_id) is False
        model.close()


async def test_async_client(s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 2 << 20, shards=2, layer_bytes=1 << 19)
    want = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        want.update(load_file(f))
    uri = upload(s3, tmp_path / "m", prefix)
    async with AsyncClient(daemon.socket) as client:
        model = await client.load(uri)
        assert_same_tensors(model.tensors, want)
        assert len((await client.status()).models[0].lease_clients) == 1
        model.close()
        del model
        gc.collect()
        deadline = time.monotonic() + 10
        while (await client.status()).models[0].leases and time.monotonic() < deadline:
            await __import__("asyncio").sleep(0.02)
        assert (await client.status()).models[0].leases == 0
