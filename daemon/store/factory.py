"""A store for a source URI: the one place that picks the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorferry.daemon.source import SourceRef
from tensorferry.daemon.store.base import Store
from tensorferry.daemon.store.cache import CachingStore, DiskTier
from tensorferry.daemon.store.local import LocalStore
from tensorferry.errors import FailedPrecondition, quote

if TYPE_CHECKING:
    from tensorferry.daemon.store.s3 import S3Backend


def open_store(ref: SourceRef, backend: S3Backend | None, tier: DiskTier | None = None) -> Store:
    """The store of ``ref`` (S3 through ``backend``), behind the disk tier when there is one.

    ``backend`` is None in a daemon without aiobotocore (a GPU image that serves local
    directories): an s3:// source then fails with the install line, not an AttributeError.
    """
    store: Store
    if ref.scheme == "s3":
        if backend is None:
            raise FailedPrecondition(
                f"{quote(ref.uri, bare=True)} needs the daemon's S3 support, which is not "
                "installed: pip install 'tensorferry[daemon]' on the daemon's host"
            )
        # Imported here: a daemon serving local directories only needs no aiobotocore.
        from tensorferry.daemon.store.s3 import S3Store

        store = S3Store(backend, ref.bucket, ref.prefix, ref.single)
    else:
        assert ref.path is not None
        store = LocalStore(ref.path, ref.uri.removesuffix(ref.single or ""), ref.single)
    return store if tier is None else CachingStore(store, tier)
