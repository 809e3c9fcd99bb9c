"""Project hygiene: generated code is fresh, the public client surface is pinned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tensorferry.client

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_client_public_surface() -> None:
    assert sorted(tensorferry.client.__all__) == [
        "AccessDenied", "AsyncClient", "Client", "DaemonNotRunning", "DaemonUnavailable",
        "InvalidArtifact", "InvalidRequest", "LoadedModel", "ResourceExhausted",
        "SourceNotAllowed", "SourceNotFound", "TensorferryError", "TlsConfig",
        "close_released_gpu_mappings",
    ]  # fmt: skip


def test_client_does_not_import_the_daemon_stack() -> None:
    code = (
        "import sys, tensorferry.client; "
        "bad = [m for m in ('aiobotocore', 'botocore', 'uvloop', 'tensorferry.daemon') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
