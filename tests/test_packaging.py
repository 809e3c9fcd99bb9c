"""What an install pulls in (issue #18): one cupy per CUDA major version, never two, and a
daemon that serves local directories without aiobotocore."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.errors import FailedPrecondition
from tests.conftest import assert_same_tensors, daemon_env, running_daemon

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PROJECT["project"]["optional-dependencies"]

#: Put on the daemon's PYTHONPATH: aiobotocore and botocore fail to import, as on a GPU image
#: that has neither and reaches no index.
NO_S3 = textwrap.dedent(
    """
    import sys

    class _NoS3:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("aiobotocore", "botocore"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoS3())
    """
)
NO_S3_WARNING = (
    "S3 support is not installed (No module named 'aiobotocore'): serving local directories "
    "only; pip install 'tensorferry[daemon]' to read s3:// sources"
)


def test_build_requires_a_setuptools_that_reads_an_spdx_license() -> None:
    # `license = "Apache-2.0"` (PEP 639) is an error before setuptools 77.
    assert isinstance(PROJECT["project"]["license"], str)
    (setuptools,) = (Requirement(r) for r in PROJECT["build-system"]["requires"])
    assert setuptools.name == "setuptools"
    assert not setuptools.specifier.contains("76.1.0")
    assert setuptools.specifier.contains("77.0.0")


def test_one_cuda_extra_per_cuda_major_version() -> None:
    assert EXTRAS["cuda12"] == ["cupy-cuda12x>=13"]
    assert EXTRAS["cuda13"] == ["cupy-cuda13x>=14"]
    assert EXTRAS["cuda"] == ["tensorferry[cuda12]"]  # the old name, for existing installs


def test_only_the_cuda_extras_name_a_cupy() -> None:
    # Every cupy wheel installs the same `cupy` folder: `dev` on a CUDA 13 host must not
    # lay cupy-cuda12x over its cupy-cuda13x.
    named = {
        extra: [r for r in reqs if Requirement(r).name.startswith("cupy")]
        for extra, reqs in EXTRAS.items()
    }
    assert {extra: reqs for extra, reqs in named.items() if reqs} == {
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=14"],
    }


def test_ci_keeps_a_driverless_cupy_and_torch_stays_a_range() -> None:
    # CI proves that cupy without a driver reads as "no CUDA": setup installs cuda12, pinned.
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "-c constraints.txt -e '.[dev,cuda12,transformers]'" in setup
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "cupy-cuda12x==14.2.0" in pins
    assert "torch==2.13.0" in pins
    (torch,) = (Requirement(r) for r in PROJECT["project"]["dependencies"] if r.startswith("torch"))
    # GPU images bring their own CUDA build of torch (2.11+cu130 on the verification host).
    assert torch.specifier.contains("2.11.0+cu130")
    assert torch.specifier.contains("2.13.0")


def test_a_daemon_without_aiobotocore_serves_local_directories(tmp_path: Path) -> None:
    hide = tmp_path / "no_s3"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_S3)
    env = daemon_env(None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hide), env.get("PYTHONPATH")) if p)
    src = tmp_path / "models" / "m"
    write_model(src, 2 << 20, shards=2, layer_bytes=1 << 20)
    want: dict[str, object] = {}
    for f in sorted(src.glob("*.safetensors")):
        want.update(load_file(f))
    allow = [str(tmp_path / "models"), "s3://bucket/"]
    with running_daemon(env, allow=allow) as daemon:
        with daemon.client() as client:
            with client.load(str(src)) as model:
                assert_same_tensors(model.tensors, want)  # type: ignore[arg-type]
            with pytest.raises(FailedPrecondition) as refused:
                client.load("s3://bucket/m/")
        assert refused.value.message == (
            "s3://bucket/m/ needs the daemon's S3 support, which is not installed: "
            "pip install 'tensorferry[daemon]' on the daemon's host"
        )
        assert daemon.output().count(NO_S3_WARNING) == 1, daemon.output()
        # doctor, on the same host, says what is missing instead of failing to import.
        config = daemon.log.parent / "tensorferry.toml"
        doctor = subprocess.run(
            [sys.executable, "-m", "tensorferry", "doctor", "--config", str(config),
             "--socket", str(daemon.socket)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = doctor.stdout.splitlines()
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert doctor.stderr == ""
        assert f"ok    allowlist {tmp_path / 'models'}: local directory" in lines
        assert "FAIL  allowlist s3://bucket/: S3 support is not installed" in lines
