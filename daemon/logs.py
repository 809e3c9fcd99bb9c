"""Logging setup: plain text for a terminal, JSON lines for log shippers.

Every finished load is logged once with the same figures ``tensorferry status`` shows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorferry.daemon.records import LoadRecord

log = logging.getLogger("tensorferry.loads")
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_load(record: LoadRecord) -> None:
    fields = dataclasses.asdict(record)
    fields["retry_causes"] = dict(record.retry_causes)
    fields["gbps"] = (
        round(record.bytes / record.total_seconds / 1e9, 3) if record.total_seconds else 0
    )
    log.info(
        "load %s %s: %d bytes in %.2f s", record.outcome, record.uri, record.bytes,
        record.total_seconds, extra={"load": fields},
    )  # fmt: skip
