"""Keys rotated on the live store while the daemon runs: picked up per request, no restart."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]
from safetensors.torch import load_file

from tensorferry.client import AccessDenied
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import (
    BUCKET,
    assert_clean,
    assert_same_tensors,
    daemon_env,
    running_daemon,
    upload,
)


def write_credentials(path: Path, access_key: str, secret_key: str) -> None:
    """What the daemon's `credential_process` prints: the key pair, expiring in 5 minutes.

    botocore runs the process again whenever the credentials it holds expire within 15
    minutes, so with 5 left every request the daemon signs reads this file anew.
    """
    expiration = datetime.now(UTC) + timedelta(minutes=5)
    doc = {
        "Version": 1,
        "AccessKeyId": access_key,
        "SecretAccessKey": secret_key,
        "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    # Atomic: the daemon may run the process at any moment.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def test_rotated_key_is_used_by_the_next_load_without_restart(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    want = load_file(tmp_path / "m" / "model.safetensors")
    before, after, revoked = (
        upload(s3, tmp_path / "m", f"{prefix}{name}/") for name in ("before", "after", "revoked")
    )
    tag = uuid.uuid4().hex[:8]
    name_a, name_b = f"rot-a-{tag}", f"rot-b-{tag}"
    key_a = (f"TFA{tag.upper()}", secrets.token_hex(20))
    key_b = (f"TFB{tag.upper()}", secrets.token_hex(20))

    keyfile = tmp_path / "credentials.json"
    aws_config = tmp_path / "aws-config"
    process = shlex.join([shutil.which("cat") or "/bin/cat", str(keyfile)])
    aws_config.write_text(f"[profile rot]\ncredential_process = {process}\n")
    env = daemon_env(s3)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    env["AWS_CONFIG_FILE"] = str(aws_config)  # the shared credentials file stays empty

    s3.add_identity(name_a, *key_a)
    try:
        write_credentials(keyfile, *key_a)
        with (
            running_daemon(
                env, allow=[f"s3://{BUCKET}/{prefix}"], s3_config='profile = "rot"'
            ) as d,
            d.client() as client,
        ):
            with client.load(before) as model:
                assert_same_tensors(model.tensors, want)

            # Rotate: a new key, handed to the daemon's credential source, the old one revoked.
            s3.add_identity(name_b, *key_b)
            write_credentials(keyfile, *key_b)
            s3.remove_identity(name_a)
            old = s3.client(*key_a)
            with pytest.raises(ClientError) as info:
                old.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            old.close()
            assert info.value.response["Error"]["Code"] == "InvalidAccessKeyId"
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

            # A cold load (nothing under after/ was read yet) works with the new key.
            with client.load(after) as model:
                assert_same_tensors(model.tensors, want)
            assert d.proc.poll() is None
            assert client.status().instance_id == d.instance

            # And the daemon holds no other key: revoking B as well makes the next load fail.
            s3.remove_identity(name_b)
            with pytest.raises(AccessDenied) as denied:
                client.load(revoked)
            assert denied.value.code.name == "PERMISSION_DENIED"
            assert denied.value.message == (
                f"{revoked}: the store denied access (InvalidAccessKeyId); check the daemon's "
                "credentials (instance role, AWS_PROFILE or access keys) and the bucket policy"
            )
            assert sorted(m.uri for m in client.list()) == sorted([before, after])
            assert_clean(d)
    finally:
        for identity in s3.identities():
            if identity["name"] in (name_a, name_b):
                s3.remove_identity(identity["name"])
