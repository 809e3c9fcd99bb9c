"""S3 (and S3-compatible) source: aiobotocore for credentials, signing and listing; the lean
HTTP path in ``_http`` for every byte of every object (headers and index files too).

This is the only module that imports aiobotocore, and the one table that maps the store's
errors to ours.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from types import TracebackType
from typing import Any

from tensorferry import env
from tensorferry.daemon.config.settings import S3Settings
from tensorferry.daemon.fetch.worker_main import pool_from_config
from tensorferry.daemon.fetch.workers import WorkerPool, worker_config
from tensorferry.daemon.store._http import HttpError, HttpPool, transport_error
from tensorferry.daemon.store._http_tls import certificate_refused
from tensorferry.daemon.store.base import METER, ObjectInfo, Store, StoreEvents
from tensorferry.daemon.store.proxy import ProxyChooser, ProxyFailed
from tensorferry.daemon.store.throttle import Throttles
from tensorferry.errors import (
    AccessDenied,
    SourceChanged,
    SourceNotFound,
    StoreUnavailable,
    TensorferryError,
)
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "AccountProblem"}  # fmt: skip
_XML_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
PRESIGN_SECONDS = 900
#: Through a proxy a URL may be fetched later than we ask for it (a caching proxy or a
#: P2P seed fetching the whole object from the first URL it saw): sign it for longer.
#: Temporary credentials still end it when their session does.
PROXY_PRESIGN_SECONDS = 12 * 3600
#: A presigned URL serves every range of its object for this long, then is signed again, so
#: a long load picks up refreshed instance-role credentials well before the URL expires.
REUSE_SECONDS = 60.0


def map_store_error(what: str, code: str, status: int, bucket: str) -> TensorferryError:
    """Our error for an S3 error code / HTTP status (most specific match first)."""
    if code == "NoSuchBucket":
        return SourceNotFound(f"{what}: bucket {bucket!r} does not exist")
    if code in ("NoSuchKey", "NotFound") or status == 404:
        return SourceNotFound(f"{what}: no such object")
    if code in _DENIED or status == 403:
        return AccessDenied(
            f"{what}: the store denied access ({code or status}); check the daemon's "
            "credentials (instance role, AWS_PROFILE or access keys) and the bucket policy"
        )
    if code == "PreconditionFailed" or status == 412:
        return SourceChanged(
            f"{what} was replaced while it was being loaded; load it again to get the new version"
        )
    return StoreUnavailable(f"{what}: the store answered HTTP {status} {code}".rstrip())


class S3Backend:
    """The daemon's S3 client and connection pools, opened once at start."""

    def __init__(
        self, settings: S3Settings, events: StoreEvents | None = None, *, workers: int = 0,
        worker_mode: str = "process",
    ) -> None:  # fmt: skip
        self.settings = settings
        #: Told of each successful range GET's duration and each proxy fallback (metrics).
        self.events = events or StoreEvents()
        self.proxies = ProxyChooser(settings.proxy, env.proxy_variables())
        self.local_pool = pool_from_config(worker_config(settings), self.events, self.proxies)
        #: Where range GETs go: ``local_pool`` in this process, or fetch workers (``[fetch]
        #: workers``), which hand back to it what they cannot reach.
        self.pool: HttpPool | WorkerPool = self.local_pool
        self._workers = (workers, worker_mode)
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        #: Per-bucket SlowDown pauses, shared by every load.
        self.throttles = Throttles()

    def connections(self) -> tuple[int, int]:
        """Keep-alive connections to object stores: (open, busy carrying a request)."""
        return self.pool.open_connections, self.pool.busy_connections

    def fetch_workers(self) -> list[pb.FetchWorker]:
        """Each fetch worker's figures for Status (none without workers)."""
        return self.pool.status() if isinstance(self.pool, WorkerPool) else []

    async def __aenter__(self) -> S3Backend:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        s = self.settings
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": s.addressing_style},
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_pool_connections=8,
            retries={"max_attempts": 3, "mode": "standard"},
            proxies=self._control_proxies(),
        )
        session = AioSession(profile=s.profile)
        verify = str(s.ca_bundle) if s.ca_bundle is not None else None
        self.client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                config=config,
                verify=verify,
            )
        )
        self._stack.push_async_callback(self.local_pool.aclose)
        count, mode = self._workers
        if count > 0:
            pool = WorkerPool(self.local_pool, count, mode, worker_config(s), self.events)
            self.pool = await self._stack.enter_async_context(pool)
        if self.proxies.any:
            fallback = "on" if s.proxy_fallback else "off"
            log.info("%s; direct fallback %s", self.proxies.describe(), fallback)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _control_proxies(self) -> dict[str, str] | None:
        """botocore's proxies for listing: the data path's choice for the
        configured endpoint; None (botocore's own reading of the same variables) where
        the endpoint is AWS's, which is known only once the client exists."""
        if self.settings.endpoint_url is None and self.settings.proxy is None:
            return None
        if self.settings.endpoint_url is None:
            proxy = self.proxies.for_host("https", "s3.amazonaws.com", 443)
        else:
            proxy = self.proxies.for_url(self.settings.endpoint_url)
        # {} rather than None: botocore would read the variables again and could disagree.
        return {"http": proxy.url, "https": proxy.url} if proxy is not None else {}

    def headers_for(self, uri: str) -> dict[str, str]:
        """``[s3] headers`` of the longest source prefix that ``uri`` falls under."""
        best: tuple[int, dict[str, str]] = (-1, {})
        for prefix, pairs in self.settings.headers:
            if uri.startswith(prefix) and len(prefix) > best[0]:
                best = (len(prefix), dict(pairs))
        return best[1]

    @property
    def presign_seconds(self) -> int:
        return PROXY_PRESIGN_SECONDS if self.proxies.any else PRESIGN_SECONDS

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def translate(self, what: str, bucket: str, exc: Exception) -> TensorferryError:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            SSLError,
        )

        if isinstance(exc, TensorferryError):
            return exc
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            return map_store_error(what, str(err.get("Code", "")), status, bucket)
        if isinstance(exc, NoCredentialsError):
            return AccessDenied(
                f"{what}: the daemon found no AWS credentials; give it an instance role, "
                "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return certificate_refused(what, str(exc), self.settings.ca_bundle)
        if isinstance(exc, EndpointConnectionError):
            return StoreUnavailable(f"{what}: cannot reach the store at {self.endpoint}")
        if isinstance(exc, BotoCoreError):
            return StoreUnavailable(f"{what}: {exc}")
        if isinstance(exc, HttpError):
            m = _XML_CODE.search(exc.body)
            code = m.group(1).decode("ascii", "replace") if m else ""
            return map_store_error(what, code, exc.status, bucket)
        if isinstance(exc, ProxyFailed):
            return StoreUnavailable(f"{what}: {exc} ([s3] proxy_fallback is off)")
        if isinstance(exc, OSError | TimeoutError):
            return transport_error(what, exc)
        raise exc


class S3Store(Store):
    """Objects under ``s3://bucket/prefix/`` (or one object when ``single`` is set)."""

    def __init__(self, backend: S3Backend, bucket: str, prefix: str, single: str | None) -> None:
        self.backend = backend
        self.bucket = bucket
        self.prefix = prefix
        self.single = single
        self.uri = f"s3://{bucket}/{prefix}"
        self._urls: dict[str, tuple[str, float]] = {}
        self._headers = backend.headers_for(self.uri + (single or ""))

    async def list_objects(self) -> list[ObjectInfo]:
        client = self.backend.client
        objects: list[ObjectInfo] = []
        token: str | None = None
        try:
            while True:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
                kwargs["Delimiter"] = "/"
                if token:
                    kwargs["ContinuationToken"] = token
                page = await client.list_objects_v2(**kwargs)
                for item in page.get("Contents", ()):
                    name = item["Key"][len(self.prefix) :]
                    if name and (self.single is None or name == self.single):
                        objects.append(ObjectInfo(name, int(item["Size"]), item["ETag"]))
                if not page.get("IsTruncated"):
                    break
                token = page["NextContinuationToken"]
        except Exception as exc:
            raise self.backend.translate(self.uri, self.bucket, exc) from exc
        return objects

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        # Headers, index and tokenizer files take the data path too: the same proxy, the
        # same fallback, the same If-Match, and no second body copy in botocore.
        if length == 0:
            return b""
        buf = bytearray(length)
        await self.read_into(obj, start, memoryview(buf))
        return bytes(buf)

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        what = self.describe(obj)
        throttle = self.backend.throttles.of(self.bucket)
        await throttle.wait()
        try:
            url = await self._url(obj.key)
            t0 = time.monotonic()
            headers = {**self._headers, "If-Match": obj.etag}
            await self.backend.pool.get_into(url, headers, dest, start)
            self.backend.events.got(time.monotonic() - t0)
        except Exception as exc:
            self._urls.pop(obj.key, None)  # a 403 after a key rotation: sign anew next time
            if isinstance(exc, HttpError) and exc.status == 503:
                throttle.slow_down()
                if (meter := METER.get()) is not None:
                    meter.slowdowns += 1
            raise self.backend.translate(what, self.bucket, exc) from exc
        throttle.ok()

    async def _url(self, key: str) -> str:
        """A presigned GET of ``key``, shared by its ranges for REUSE_SECONDS.

        Presigning is a local HMAC with the current (refreshable) credentials, but botocore
        spends 0.2 ms of Python on it: per 8 MiB range that was half the daemon's Python
        time in a cold load.
        """
        now = time.monotonic()
        cached = self._urls.get(key)
        if cached is not None and now - cached[1] < REUSE_SECONDS:
            return cached[0]
        url: str = await self.backend.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=self.backend.presign_seconds,
        )
        self._urls[key] = (url, now)
        return url
