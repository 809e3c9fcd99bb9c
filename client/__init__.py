"""Worker-side API: ``Client`` / ``AsyncClient`` load models through the daemon.

from tensorferry.client import Client
with Client() as client, client.load("s3://bucket/model/") as model:
    weight = model.tensors["lm_head.weight"]
"""

from tensorferry.client._aio import AsyncClient
from tensorferry.client._client import Client
from tensorferry.client._core import TlsConfig
from tensorferry.client._model import LoadedModel, close_released_gpu_mappings
from tensorferry.errors import (
    AccessDenied,
    DaemonNotRunning,
    DaemonUnavailable,
    InvalidArtifact,
    InvalidRequest,
    ResourceExhausted,
    SourceNotAllowed,
    SourceNotFound,
    TensorferryError,
)

__all__ = [
    "AccessDenied",
    "AsyncClient",
    "Client",
    "DaemonNotRunning",
    "DaemonUnavailable",
    "InvalidArtifact",
    "InvalidRequest",
    "LoadedModel",
    "ResourceExhausted",
    "SourceNotAllowed",
    "SourceNotFound",
    "TensorferryError",
    "TlsConfig",
    "close_released_gpu_mappings",
]
