"""A resident model, its key and its states: what the registry keeps, per model.

A model is keyed by what it holds (``identity``): its weight objects and their version,
the tensors selected, the device and rank. States: loading -> ready -> evicting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time

from tensorferry.daemon.arrivals import Arrivals
from tensorferry.daemon.cpu_load import Loaded
from tensorferry.errors import ModelEvicted
from tensorferry.v1 import tensorferry_pb2 as pb


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelKey:
    #: The store location and its weight objects (``identity.weights_id``), not the URI
    #: typed: a directory and its single model.safetensors are one model.
    weights: str
    version: str
    device: str
    #: () for every tensor, else the selected tensor set (``TensorNames.selection_key``).
    select: tuple[str, ...] = ()
    #: A prepared artifact's shards: this rank's, of world_size (0: no rank, everything).
    rank: int = 0
    world_size: int = 0


@dataclasses.dataclass(eq=False)
class Model:
    id: str
    key: ModelKey
    #: The URI of the request that started the load (shown in List and Status).
    uri: str
    state: State = State.LOADING
    loaded: Loaded | None = None
    done: asyncio.Future[Loaded] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    bytes_done: int = 0
    bytes_total: int = 0
    leases: dict[str, str] = dataclasses.field(default_factory=dict)  # lease id -> client
    #: Requests waiting for the load to finish; when the last leaves, the fetch stops...
    waiters: int = 0
    #: ...unless a preload asked for it.
    keep: bool = False
    task: asyncio.Task[None] | None = None
    #: Who started the load (the client's declared name): per-client load limits.
    client: str = ""
    #: A lease was ended by Release while its worker may still hold views: never reuse
    #: this arena's pages for another model.
    released_early: bool = False
    #: Kept resident: never evicted to make room.
    pinned: bool = False
    #: Models on other GPUs that this model's load fills from the same fetch.
    fan_out: list[Model] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.monotonic)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    #: Every normalised URI that resolved to this model (Evict accepts any of them).
    aliases: set[str] = dataclasses.field(default_factory=set)
    #: Who evicted the model while it was loading (their waiters are told).
    evicted_by: str = ""
    #: A CPU load's complete tensors, from the moment its arena exists (streamed loads).
    arrivals: Arrivals | None = None
    #: Adopted at start from the daemon before (its arena sealed, its source unchanged).
    adopted: bool = False
    #: Not evicted to make room before this (``time.monotonic``): workers of the daemon
    #: before may still map an adopted arena and are re-establishing their leases.
    hold_until: float = 0.0

    def info(self) -> pb.ModelInfo:
        """As List and Status show it."""
        model, loaded = self, self.loaded
        return pb.ModelInfo(
            model_id=model.id, uri=model.uri, device=model.key.device,
            version=model.key.version, state=model.state.value,
            bytes=loaded.arena.size if loaded else 0,
            tensor_count=len(loaded.plan.tensors) if loaded else 0,
            leases=len(model.leases), lease_clients=sorted(model.leases.values()),
            pinned=model.pinned, waiting=model.waiters, adopted=model.adopted,
        )  # fmt: skip

    def named(self, what: str) -> bool:
        return what == self.id or what == self.uri or what in self.aliases

    def evicted_error(self) -> ModelEvicted:
        return ModelEvicted(
            f"{self.uri} was evicted by {self.evicted_by or 'an Evict call'} before it was "
            f"ready (model {self.id}); load it again"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Eviction:
    ids: list[str]
    #: Leases still holding an evicted arena: it is freed when the last one ends.
    pending_leases: int
    #: Requests that were waiting for an evicted model: they fail with ModelEvicted.
    refused_waiters: int
