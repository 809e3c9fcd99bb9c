"""Storage backends behind one small interface: `Store` (S3Store, LocalStore)."""

from tensorferry.daemon.store.base import ObjectInfo, Store

__all__ = ["ObjectInfo", "Store"]
