from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ("uri", "device", "client_name", "select", "rank", "world_size", "gpu_uuids", "stream_tensors", "resident_only")
    URI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    STREAM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    uri: str
    device: str
    client_name: str
    select: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    world_size: int
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    stream_tensors: bool
    resident_only: bool
    def __init__(self, uri: _Optional[str] = ..., device: _Optional[str] = ..., client_name: _Optional[str] = ..., select: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., stream_tensors: _Optional[bool] = ..., resident_only: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "bytes_done", "bytes_total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    bytes_done: int
    bytes_total: int
    def __init__(self, stage: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorBatch(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class CpuShmGrant(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class CudaIpcGrant(_message.Message):
    __slots__ = ("handle", "size", "gpu_uuid", "pci_bus_id")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    size: int
    gpu_uuid: str
    pci_bus_id: str
    def __init__(self, handle: _Optional[bytes] = ..., size: _Optional[int] = ..., gpu_uuid: _Optional[str] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("model_id", "lease_id", "cpu_shm", "cuda_ipc", "tensor_count", "total_bytes", "attached", "seconds", "files")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CPU_SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    lease_id: str
    cpu_shm: CpuShmGrant
    cuda_ipc: CudaIpcGrant
    tensor_count: int
    total_bytes: int
    attached: bool
    seconds: float
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., cpu_shm: _Optional[_Union[CpuShmGrant, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcGrant, _Mapping]] = ..., tensor_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., attached: _Optional[bool] = ..., seconds: _Optional[float] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class Arena(_message.Message):
    __slots__ = ("model_id", "cpu_shm", "cuda_ipc", "tensor_count")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CPU_SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    cpu_shm: CpuShmGrant
    cuda_ipc: CudaIpcGrant
    tensor_count: int
    def __init__(self, model_id: _Optional[str] = ..., cpu_shm: _Optional[_Union[CpuShmGrant, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcGrant, _Mapping]] = ..., tensor_count: _Optional[int] = ...) -> None: ...

class Landed(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tensors: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadEvent(_message.Message):
    __slots__ = ("progress", "tensors", "ready", "arena", "landed")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    LANDED_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    tensors: TensorBatch
    ready: Ready
    arena: Arena
    landed: Landed
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., tensors: _Optional[_Union[TensorBatch, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., arena: _Optional[_Union[Arena, _Mapping]] = ..., landed: _Optional[_Union[Landed, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class PreloadRequest(_message.Message):
    __slots__ = ("uri", "device", "select", "rank", "world_size", "gpu_uuids", "pin")
    URI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    uri: str
    device: str
    select: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    world_size: int
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    pin: bool
    def __init__(self, uri: _Optional[str] = ..., device: _Optional[str] = ..., select: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., pin: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "uri", "device", "version", "state", "bytes", "tensor_count", "leases", "lease_clients", "pinned", "waiting", "adopted")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASE_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    uri: str
    device: str
    version: str
    state: str
    bytes: int
    tensor_count: int
    leases: int
    lease_clients: _containers.RepeatedScalarFieldContainer[str]
    pinned: bool
    waiting: int
    adopted: bool
    def __init__(self, model_id: _Optional[str] = ..., uri: _Optional[str] = ..., device: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., bytes: _Optional[int] = ..., tensor_count: _Optional[int] = ..., leases: _Optional[int] = ..., lease_clients: _Optional[_Iterable[str]] = ..., pinned: _Optional[bool] = ..., waiting: _Optional[int] = ..., adopted: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model", "client_name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    client_name: str
    def __init__(self, model: _Optional[str] = ..., client_name: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted", "pending_leases", "refused_waiters")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_LEASES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_WAITERS_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.RepeatedScalarFieldContainer[str]
    pending_leases: int
    refused_waiters: int
    def __init__(self, evicted: _Optional[_Iterable[str]] = ..., pending_leases: _Optional[int] = ..., refused_waiters: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadRecord(_message.Message):
    __slots__ = ("uri", "outcome", "plan_seconds", "first_byte_seconds", "fetch_seconds", "total_seconds", "bytes", "gbps", "error", "retries", "retry_causes", "hedges", "workers", "arena_seconds")
    class RetryCausesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    URI_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BYTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FETCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    GBPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_CAUSES_FIELD_NUMBER: _ClassVar[int]
    HEDGES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ARENA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    uri: str
    outcome: str
    plan_seconds: float
    first_byte_seconds: float
    fetch_seconds: float
    total_seconds: float
    bytes: int
    gbps: float
    error: str
    retries: int
    retry_causes: _containers.ScalarMap[str, int]
    hedges: int
    workers: int
    arena_seconds: float
    def __init__(self, uri: _Optional[str] = ..., outcome: _Optional[str] = ..., plan_seconds: _Optional[float] = ..., first_byte_seconds: _Optional[float] = ..., fetch_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., gbps: _Optional[float] = ..., error: _Optional[str] = ..., retries: _Optional[int] = ..., retry_causes: _Optional[_Mapping[str, int]] = ..., hedges: _Optional[int] = ..., workers: _Optional[int] = ..., arena_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "instance_id", "pid", "uptime_seconds", "models", "recent_loads", "resident_bytes", "shm_budget_bytes", "store_connections_open", "arenas", "store_connections_busy", "recycled_bytes", "rings", "adopted_models", "adopted_bytes", "fetch_workers", "gpus")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RECENT_LOADS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_CONNECTIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    ARENAS_FIELD_NUMBER: _ClassVar[int]
    STORE_CONNECTIONS_BUSY_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RINGS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_MODELS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FETCH_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    version: str
    instance_id: str
    pid: int
    uptime_seconds: float
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    recent_loads: _containers.RepeatedCompositeFieldContainer[LoadRecord]
    resident_bytes: int
    shm_budget_bytes: int
    store_connections_open: int
    arenas: _containers.RepeatedScalarFieldContainer[str]
    store_connections_busy: int
    recycled_bytes: int
    rings: _containers.RepeatedCompositeFieldContainer[RingInfo]
    adopted_models: int
    adopted_bytes: int
    fetch_workers: _containers.RepeatedCompositeFieldContainer[FetchWorker]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    def __init__(self, version: _Optional[str] = ..., instance_id: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., recent_loads: _Optional[_Iterable[_Union[LoadRecord, _Mapping]]] = ..., resident_bytes: _Optional[int] = ..., shm_budget_bytes: _Optional[int] = ..., store_connections_open: _Optional[int] = ..., arenas: _Optional[_Iterable[str]] = ..., store_connections_busy: _Optional[int] = ..., recycled_bytes: _Optional[int] = ..., rings: _Optional[_Iterable[_Union[RingInfo, _Mapping]]] = ..., adopted_models: _Optional[int] = ..., adopted_bytes: _Optional[int] = ..., fetch_workers: _Optional[_Iterable[_Union[FetchWorker, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("ordinal", "uuid", "pci_bus_id", "context", "opened", "arena_bytes", "ring_bytes")
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    RING_BYTES_FIELD_NUMBER: _ClassVar[int]
    ordinal: int
    uuid: str
    pci_bus_id: str
    context: bool
    opened: bool
    arena_bytes: int
    ring_bytes: int
    def __init__(self, ordinal: _Optional[int] = ..., uuid: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., context: _Optional[bool] = ..., opened: _Optional[bool] = ..., arena_bytes: _Optional[int] = ..., ring_bytes: _Optional[int] = ...) -> None: ...

class FetchWorker(_message.Message):
    __slots__ = ("index", "mode", "pid", "bytes", "gets", "cpu_seconds", "restarts", "connections_open")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    index: int
    mode: str
    pid: int
    bytes: int
    gets: int
    cpu_seconds: float
    restarts: int
    connections_open: int
    def __init__(self, index: _Optional[int] = ..., mode: _Optional[str] = ..., pid: _Optional[int] = ..., bytes: _Optional[int] = ..., gets: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., restarts: _Optional[int] = ..., connections_open: _Optional[int] = ...) -> None: ...

class RingInfo(_message.Message):
    __slots__ = ("numa_node", "slots", "slot_bytes", "free_slots", "slots_taken", "gpu_uuids", "sizing", "pinned")
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TAKEN_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    SIZING_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    numa_node: int
    slots: int
    slot_bytes: int
    free_slots: int
    slots_taken: int
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    sizing: str
    pinned: bool
    def __init__(self, numa_node: _Optional[int] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., free_slots: _Optional[int] = ..., slots_taken: _Optional[int] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., sizing: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class GetFileRequest(_message.Message):
    __slots__ = ("uri", "name")
    URI_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    uri: str
    name: str
    def __init__(self, uri: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "offset", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...
