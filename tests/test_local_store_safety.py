"""A local directory source serves only the regular files in it (issue #25): a name swapped
between a file and a symlink to a file outside never hands out the outside file, and a
file that vanishes while the directory is listed is skipped, not an internal error."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorferry.daemon.source import list_source, parse_uri
from tensorferry.daemon.store import beneath
from tensorferry.daemon.store.local import LocalStore
from tensorferry.errors import AccessDenied, SourceChanged, SourceNotFound
from tests._hardening_input_helpers import local_daemon, write_raw

INSIDE = b'{"served": "the file inside the allowlisted directory"}'
SECRET = b"SECRET-" * 9  # same size as INSIDE: a size check alone cannot tell them apart
#: A swapped name may be refused, with one of these; never answered from outside.
CLEAN = (SourceChanged, SourceNotFound, AccessDenied)
RACE_SECONDS = 2.0
CALLERS = 4


@contextlib.contextmanager
def swapping(root: Path, name: str) -> Iterator[list[int]]:
    """A thread that swaps ``root/name`` between a regular file and a symlink to a secret
    outside ``root`` (each swap one atomic rename), until the block ends."""
    staging = root.parent / "staging"
    staging.mkdir()
    secret = root.parent / "secret.txt"
    secret.write_bytes(SECRET)
    (root / name).write_bytes(INSIDE)
    stop, swaps = threading.Event(), [0]

    def swap() -> None:
        while not stop.is_set():
            os.symlink(secret, staging / "link")
            os.replace(staging / "link", root / name)
            (staging / "file").write_bytes(INSIDE)
            os.replace(staging / "file", root / name)
            swaps[0] += 1

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        yield swaps
    finally:
        stop.set()
        thread.join()


class Outcomes:
    """What the calls of a race got: bytes must be the file inside, errors clean refusals."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RACE_SECONDS
        self.served = 0
        self.wrong: collections.Counter[str] = collections.Counter()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    @contextlib.contextmanager
    def call(self) -> Iterator[list[bytes | None]]:
        answer: list[bytes | None] = [None]
        try:
            yield answer
        except CLEAN:
            return
        except Exception as exc:
            self.wrong[f"{type(exc).__name__}: {exc}"[:120]] += 1
            return
        if answer[0] == INSIDE:
            self.served += 1
        elif answer[0] is not None:
            self.wrong[f"served {answer[0]!r}"] += 1

    def check(self) -> None:
        assert dict(self.wrong) == {}
        assert self.served > 0  # the file itself is still served between swaps


@pytest.fixture(params=["openat2", "O_NOFOLLOW"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of opening without following a symlink: openat2, and one component at a
    time where the kernel lacks it."""
    if request.param == "O_NOFOLLOW":
        monkeypatch.setattr(beneath, "_probed", True)
        monkeypatch.setattr(beneath, "_syscall", None)
    else:
        assert beneath._have_openat2(), "this kernel has no openat2"
    return str(request.param)


def test_a_name_swapped_for_a_symlink_never_serves_the_outside_file(
    local_root: Path, resolver: str
) -> None:
    write_raw(local_root, b"{}")
    store = LocalStore(local_root, str(local_root) + "/")

    outcomes = Outcomes()

    async def list_and_read() -> None:
        # One loop for the whole race: more calls in the time, so more interleavings.
        while outcomes.running():
            with outcomes.call() as answer:
                obj = {o.key: o for o in await store.list_objects()}.get("config.json")
                answer[0] = None if obj is None else await store.read(obj, 0, obj.size)

    with swapping(local_root, "config.json") as swaps:
        asyncio.run(list_and_read())
    assert swaps[0] > 0
    outcomes.check()


def test_getfile_never_serves_a_file_outside_the_allowlist(local_root: Path) -> None:
    uri = write_raw(local_root / "m", b"{}")
    with local_daemon(local_root) as d, d.client() as client:
        outcomes = Outcomes()

        def caller() -> None:
            while outcomes.running():
                with outcomes.call() as answer:
                    answer[0] = client.read_file(uri, "config.json")

        # Several calls at once: the daemon lists and reads in threads that interleave.
        with swapping(local_root / "m", "config.json") as swaps:
            callers = [threading.Thread(target=caller) for _ in range(CALLERS)]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join()
        assert swaps[0] > 0
        outcomes.check()
        assert client.read_file(uri, "config.json") == INSIDE


async def test_a_symlinked_file_is_not_served_even_inside_the_root(
    local_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_raw(local_root, b"{}")
    (local_root / "real.json").write_bytes(INSIDE)
    (local_root / "config.json").symlink_to(local_root / "real.json")
    store = LocalStore(local_root, str(local_root) + "/")
    listed = await store.list_objects()
    assert [o.key for o in listed] == ["model.safetensors", "real.json"]
    assert caplog.messages == [
        f"{local_root}/: not serving ['config.json']: symbolic links are not followed (one "
        "could be swapped to point outside the directory); copy or hard-link the files instead"
    ]
    # Listed as a file, a symlink by the time it is read.
    real = next(o for o in listed if o.key == "real.json")
    os.replace(local_root / "config.json", local_root / "real.json")
    with pytest.raises(AccessDenied) as info:
        await store.read(real, 0, real.size)
    assert info.value.message == (
        f"{local_root}/real.json is a symbolic link; the daemon serves only regular files in "
        f"{local_root}/"
    )


async def test_a_file_replaced_after_the_listing_is_refused(local_root: Path) -> None:
    write_raw(local_root, b"{}")
    (local_root / "config.json").write_bytes(INSIDE)
    store = LocalStore(local_root, str(local_root) + "/")
    [obj, _] = await store.list_objects()
    assert obj.key == "config.json"
    (local_root / "other").write_bytes(INSIDE)
    os.replace(local_root / "other", local_root / "config.json")  # same size, another inode
    with pytest.raises(SourceChanged) as info:
        await store.read(obj, 0, obj.size)
    assert info.value.message == (
        f"{local_root}/config.json was replaced while it was being loaded; load it again to "
        "get the new version"
    )


@pytest.mark.parametrize("swapped", ["model", "above"])
async def test_a_root_whose_path_becomes_a_symlink_is_not_followed(
    tmp_path: Path, resolver: str, swapped: str
) -> None:
    (tmp_path / "elsewhere" / "model").mkdir(parents=True)
    write_raw(tmp_path / "elsewhere" / "model", b"{}")
    (tmp_path / "above" / "model").mkdir(parents=True)
    ref = parse_uri(str(tmp_path / "above" / "model"))  # resolved and checked: no symlink
    # Then the directory, or one above it, is swapped for a symlink to another directory.
    gone = tmp_path / "above" / "model" if swapped == "model" else tmp_path / "above"
    gone.rename(tmp_path / "gone")
    gone.symlink_to(tmp_path / "elsewhere" / ("model" if swapped == "model" else ""))
    store = LocalStore(ref.path or Path(), ref.uri)
    with pytest.raises(SourceChanged) as info:
        await store.list_objects()
    assert info.value.message == (
        f"{ref.uri}: a directory on its path was replaced by a symbolic link while it was "
        "being loaded; the daemon follows no symlink there, load it again"
    )


async def test_a_file_that_vanishes_while_listing_is_skipped(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_raw(local_root, b"{}")
    part = local_root / "model-2.safetensors.part"  # a downloader's temporary file
    part.write_bytes(b"partial")

    def vanishing(real: Callable[..., Any]) -> Callable[..., Any]:
        def read_directory(*args: Any) -> Any:
            names = list(real(*args))  # the directory as it was read...
            part.unlink(missing_ok=True)  # ...then the downloader renames its file
            return names

        return read_directory

    monkeypatch.setattr(os, "listdir", vanishing(os.listdir))
    monkeypatch.setattr(os, "scandir", vanishing(os.scandir))
    ref = parse_uri(str(local_root))
    listing = await list_source(ref, LocalStore(local_root, ref.uri))
    assert [o.key for o in listing] == ["model.safetensors"]


def test_doctor_warns_when_hard_links_are_not_protected(tmp_path: Path) -> None:
    from tensorferry.daemon.config.settings import Settings
    from tensorferry.daemon.doctor import check_hardlinks

    sysctl = tmp_path / "protected_hardlinks"
    lines: list[tuple[str, str, str]] = []
    for value, allow in (("1\n", ("/srv/models",)), ("0\n", ("s3://b/",)), ("0\n", ("/m",))):
        sysctl.write_text(value)
        check_hardlinks(Settings(allow=allow), lambda *line: lines.append(line), sysctl)
    assert lines == [
        (
            "warn", "fs.protected_hardlinks = 0",
            "set it to 1 (sysctl): without it, a user who can write into an allowlisted "
            "directory can hard-link any file the daemon can read (its credentials) into it "
            "and fetch it",
        )
    ]  # fmt: skip
