"""`tensorferry prepare`: an open, engine-neutral artifact (docs/format.md) from safetensors.

Runs on any CPU box, not in the daemon; only the CLI's prepare command imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from tensorferry.daemon.config.settings import ConfigError, S3Settings, load_s3_settings, parse_size
from tensorferry.daemon.source import SourceRef, parse_uri
from tensorferry.daemon.store.factory import open_store
from tensorferry.daemon.store.s3 import S3Backend
from tensorferry.errors import InvalidRequest
from tensorferry.format.manifest import (
    MANIFEST_NAME,
    MAX_ALIGN,
    MAX_CHUNK,
    MIN_ALIGN,
    MIN_CHUNK,
)
from tensorferry.prepare.outputs import Destination, LocalDestination, S3Destination
from tensorferry.prepare.run import Options, ProgressFn, Result, run_prepare
from tensorferry.prepare.shardplan import check_world_size, load_shard_plan


def check_sizes(chunk_size: int, align: int) -> None:
    if align & (align - 1) or not MIN_ALIGN <= align <= MAX_ALIGN:
        raise InvalidRequest(
            f"--align must be a power of two from {MIN_ALIGN} B to {MAX_ALIGN >> 20} MiB, "
            f"got {align}"
        )
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size % align:
        raise InvalidRequest(
            f"--chunk-size must be a multiple of --align ({align}) from {MIN_CHUNK >> 10} KiB "
            f"to {MAX_CHUNK >> 30} GiB, got {chunk_size}"
        )


def _refs(src: str, dst: str) -> tuple[SourceRef, SourceRef]:
    src_ref, dst_ref = parse_uri(src), parse_uri(dst)
    if dst_ref.single is not None:
        raise InvalidRequest(f"DST {dst} must be a directory or an s3:// prefix, not a file")
    if src_ref.uri.rstrip("/") == dst_ref.uri.rstrip("/"):
        raise InvalidRequest("DST must differ from SRC: the artifact goes beside, not over")
    return src_ref, dst_ref


async def prepare(
    options: Options, progress: ProgressFn | None = None, *, s3: S3Settings | None = None
) -> Result:
    """Prepare ``options.src`` into ``options.dst`` (local directories or s3:// prefixes);
    ``s3``: how to reach the store (the CLI reads a config file's ``[s3]``), else defaults."""
    check_sizes(options.chunk_size, options.align)
    check_world_size(options.world_size, options.plan)
    src, dst = _refs(options.src, options.dst)
    async with S3Backend(s3 or S3Settings()) as backend:
        store = open_store(src, backend)
        dest: Destination
        if dst.scheme == "s3":
            dest = S3Destination(backend, dst.bucket, dst.prefix)
        else:
            assert dst.path is not None
            dst.path.mkdir(parents=True, exist_ok=True)
            dest = LocalDestination(dst.path)
        return await run_prepare(options, store, dest, progress)


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).resolve())


def options_from_args(args: argparse.Namespace) -> Options:
    try:
        chunk_size = parse_size(args.chunk_size, "--chunk-size")
        align = parse_size(args.align, "--align")
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from None
    plan = load_shard_plan(args.shard_plan) if args.shard_plan else None
    return Options(
        src=_absolute(args.src), dst=_absolute(args.dst), chunk_size=chunk_size, align=align,
        plan=plan, world_size=args.tp,
    )  # fmt: skip


def main(args: argparse.Namespace, progress: ProgressFn | None) -> int:
    import uvloop

    options = options_from_args(args)
    s3 = load_s3_settings(args.config)

    async def run() -> Result:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM unwinds like Ctrl-C: open multipart uploads are aborted on the way out.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await prepare(options, progress, s3=s3)

    try:
        result = uvloop.run(run())
    except asyncio.CancelledError:
        print("tensorferry prepare: stopped before the manifest was written; its multipart "
              "uploads were aborted: run it again", file=sys.stderr)  # fmt: skip
        return 143
    if progress is not None and sys.stderr.isatty():
        print(file=sys.stderr)
    m = result.manifest
    data = sum(o.size for o in m.objects)
    for name in result.skipped:
        print(f"tensorferry prepare: not copied (another weight format or name): {name}",
              file=sys.stderr)  # fmt: skip
    for number in result.unmatched_rules:
        print(f"tensorferry prepare: shard rule {number} matched no tensor", file=sys.stderr)
    print(
        f"prepared {options.src} -> {result.dst}: {len(m.tensors)} tensors, "
        f"{data / 1e9:.3f} GB in {len(m.objects)} data objects, {len(m.files)} files, "
        f"tp {m.world_size}, in {result.seconds:.2f} s "
        f"({result.source_bytes / max(result.seconds, 1e-9) / 1e9:.2f} GB/s)"
    )
    print(f"manifest {result.dst}{MANIFEST_NAME}: {len(result.manifest_bytes)} bytes, "
          f"source {m.source_digest}")  # fmt: skip
    if result.cleaned:
        print(f"removed {result.cleaned} partial uploads/files of an earlier run")
    return 0
