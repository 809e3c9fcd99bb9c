"""A SeaweedFS cluster as a read-through cache of another S3 store: ``remote.configure`` an
origin, ``remote.mount`` one of its buckets under ``/buckets/NAME``, and serve it over the
cache's own S3 API.

What SeaweedFS 4.48 does with a mounted bucket (measured through a counting proxy in front of
the origin; see tests/test_cache_tier.py):

- ``remote.mount`` copies the origin's listing into the filer (a LIST or two, no data); the
  bucket is then listable through the cache's S3 API with no further origin request.
- An entry whose content is still remote-only lists with an empty ETag (``""``). The first read
  of any byte of it, even a 100-byte range, makes the cache fetch the whole object from the origin
  (5 MiB ranged GETs, 5 at a time), keep it, and from then on report its own ETag (multipart
  style, ``"<md5>-<parts>"``, not the origin's). Concurrent first readers share that one fetch.
- So a reader that lists first and then sends ``If-Match`` with the listed ETag (as the
  daemon does) fails on a cold mount: its GETs carry ``If-Match: ""`` while the object takes
  its new ETag (412). Eight daemons loading a cold mount at once all failed with
  SourceChanged, though the origin served one copy. ``cache_remote`` (``remote.cache``) warms
  a mount before readers arrive; after it every ETag is stable.
- ``remote.cache`` with its default ``-deleteLocalExtra=true`` fails once the bucket has a key
  under a prefix ("fail to delete non-empty folder: /buckets/B/llm"): S3 lists no directory
  entries, so the filer's implied directories look like local extras. Hence
  ``-deleteLocalExtra=false`` below.
- A loopback or link-local origin is refused unless the cache runs with
  ``UNTRUSTED_REMOTE_FLAGS``. None of these shell commands needs ``lock``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

from tensorferry.devtools.s3server import S3Server

__all__ = [
    "UNTRUSTED_REMOTE_FLAGS",
    "cache_remote",
    "configure_remote",
    "mount_remote",
    "remote_only_keys",
    "run_shell",
]

#: ``run_seaweed(..., extra_flags=UNTRUSTED_REMOTE_FLAGS)``: lets the cache read an origin on
#: loopback (tests). A real origin on a public endpoint needs none of them.
UNTRUSTED_REMOTE_FLAGS = (
    "-filer.allowUntrustedRemoteEndpoints",
    "-s3.allowUntrustedRemoteEndpoints",
    "-volume.allowUntrustedRemoteEndpoints",
)
_SHELL_TIMEOUT_S = 60.0
_VISIBLE_TIMEOUT_S = 15.0
# `weed shell` splits a command line on whitespace and has no quoting.
_SHELL_WORD = re.compile(r"[A-Za-z0-9._@+=/:-]+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def run_shell(
    server: S3Server,
    command: str,
    *,
    timeout: float = _SHELL_TIMEOUT_S,
    secrets: Iterable[str] = (),
) -> str:
    """One ``weed shell`` command's stdout; RuntimeError with its output if it fails or runs
    past ``timeout``. ``secrets`` are blanked out of that message (it quotes the command)."""
    hidden = [s for s in secrets if s]

    def redact(text: str) -> str:
        for secret in hidden:
            text = text.replace(secret, "***")
        return text

    try:
        return server.shell(command, timeout=timeout)
    except RuntimeError as exc:
        # `from None`: the original message still holds the secret.
        raise RuntimeError(redact(str(exc))) from None
    except subprocess.TimeoutExpired as exc:
        output = "\n".join(_text(part) for part in (exc.stdout, exc.stderr) if part)
        raise RuntimeError(
            redact(f"weed shell {command!r} did not finish within {timeout:.0f} s: {output}")
        ) from None


def configure_remote(
    cache: S3Server,
    origin_endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    name: str = "origin",
    region: str = "us-east-1",
) -> None:
    """Register the origin store as remote ``name`` on ``cache``; the cache keeps the keys.

    Path-style addressing (weed's default for s3) suits any S3-compatible origin; SigV4 is
    what AWS and SeaweedFS both accept.
    """
    for value in (origin_endpoint, access_key, secret_key, name, region):
        _check_word(value)
    run_shell(
        cache,
        f"remote.configure -name={name} -type=s3 -s3.endpoint={origin_endpoint} "
        f"-s3.region={region} -s3.access_key={access_key} -s3.secret_key={secret_key} "
        "-s3.force_path_style=true -s3.v4_signature=true",
        secrets=(secret_key,),
    )


def mount_remote(
    cache: S3Server,
    local_bucket: str,
    remote_name: str,
    remote_bucket: str,
    *,
    nonempty: bool = False,
    timeout: float = _VISIBLE_TIMEOUT_S,
) -> str:
    """Mount ``remote_name/remote_bucket`` as the cache's bucket ``local_bucket``; returns the
    shell's output (one line per entry created). Waits until the S3 API lists the bucket."""
    for value in (remote_name, remote_bucket):
        _check_word(value)
    _check_bucket(local_bucket)
    command = f"remote.mount -dir=/buckets/{local_bucket} -remote={remote_name}/{remote_bucket}"
    output = run_shell(cache, command + (" -nonempty" if nonempty else ""))
    client = cache.client()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.list_objects_v2(Bucket=local_bucket, MaxKeys=1)
                return output
            except ClientError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"bucket {local_bucket!r} not visible through {cache.endpoint} "
                        f"{timeout:.0f} s after remote.mount: {exc}"
                    ) from exc
            time.sleep(0.05)
    finally:
        client.close()


def cache_remote(
    cache: S3Server, local_bucket: str, prefix: str = "", *, timeout: float = _SHELL_TIMEOUT_S
) -> list[str]:
    """Fetch every remote-only object under ``prefix`` of the mounted bucket into the cache
    (once each, whatever reads come later); returns the keys under it. Raises if any is still
    remote-only afterwards."""
    _check_bucket(local_bucket)
    directory = f"/buckets/{local_bucket}/{prefix}".rstrip("/")
    _check_word(directory)
    output = run_shell(
        cache, f"remote.cache -dir={directory} -deleteLocalExtra=false", timeout=timeout
    )
    keys, cold = _listing(cache, local_bucket, prefix)
    if cold:
        raise RuntimeError(f"remote.cache left {cold} remote-only; its output:\n{output}")
    return keys


def remote_only_keys(cache: S3Server, local_bucket: str, prefix: str = "") -> list[str]:
    """Keys under ``prefix`` whose content the cache has not fetched yet (ETag ``""``)."""
    return _listing(cache, local_bucket, prefix)[1]


def _listing(cache: S3Server, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    client = cache.client()
    keys: list[str] = []
    cold: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            item: dict[str, Any]
            for item in page.get("Contents", []):
                keys.append(item["Key"])
                if item.get("ETag", "").strip('"') == "":
                    cold.append(item["Key"])
    finally:
        client.close()
    return keys, cold


def _check_word(value: str) -> None:
    if not _SHELL_WORD.fullmatch(value):
        raise ValueError(f"{value!r} cannot be passed through `weed shell`")


def _check_bucket(name: str) -> None:
    if not _BUCKET.fullmatch(name):
        raise ValueError(f"{name!r} is not an S3 bucket name")


def _text(part: str | bytes) -> str:
    # TimeoutExpired carries bytes even when run() was asked for text.
    return part.decode(errors="replace") if isinstance(part, bytes) else part
