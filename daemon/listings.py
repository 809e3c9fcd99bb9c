"""Recent listings of sources, reused by attaches for ``[sources] listing_reuse`` seconds.

Every load lists its source to learn the key of the model it names: on AWS that LIST is
20-60 ms, most of a warm attach. A listing begun at time ``s`` sees every change completed
before ``s`` (S3 lists are strongly consistent; a directory is read as it is), so a
request that arrives at ``t`` may reuse a listing begun at or after ``t - window`` and still
see every change completed at least ``window`` seconds before it arrived. The loader reuses
one only when the model it names is resident; any other load lists afresh.
"""

from __future__ import annotations

import collections

from tensorferry.daemon.source import SourceRef
from tensorferry.daemon.store.base import ObjectInfo

#: Sources whose last listing is kept.
LISTINGS_KEPT = 64


class RecentListings:
    def __init__(self, window: float, keep: int = LISTINGS_KEPT) -> None:
        self.window = window
        self._keep = keep
        # ref -> (when its listing began, the listing), oldest first
        self._listings: collections.OrderedDict[SourceRef, tuple[float, list[ObjectInfo]]] = (
            collections.OrderedDict()
        )

    def get(self, ref: SourceRef, arrived: float) -> list[ObjectInfo] | None:
        """The listing of ``ref`` begun at or after ``arrived - window``, if there is one."""
        if self.window <= 0:
            return None
        hit = self._listings.get(ref)
        if hit is None or hit[0] < arrived - self.window:
            return None
        return hit[1]

    def put(self, ref: SourceRef, began: float, listing: list[ObjectInfo]) -> None:
        """Keep the listing of ``ref`` begun at ``began`` (unless a later one is kept)."""
        if self.window <= 0:
            return
        hit = self._listings.get(ref)
        if hit is not None and hit[0] > began:
            return  # two loads listed at once: the later listing stays
        self._listings[ref] = (began, listing)
        self._listings.move_to_end(ref)
        while len(self._listings) > self._keep:
            self._listings.popitem(last=False)
