"""Request ids: one per HTTP request, the client's `X-Request-ID` when it sent a usable one, else made
here. The id is answered in the same header, carried by the job the request makes (its record,
events and sidecar), sent to Triton as the inference request's id, and on every log line written
while the request or its job is being handled (`configure_logging`; the id is set by
gateway.middleware.RequestIdMiddleware and by each job's task).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

HEADER = "X-Request-ID"
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what may travel in headers, logs and Triton unchanged
current: ContextVar[str] = ContextVar("request_id", default="-")


def accept(offered: str | None) -> str:
    """The client's id when it is 1-128 of letters, digits and `._:-`; otherwise a new one."""
    return offered if offered is not None and _VALID.fullmatch(offered) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record as `request_id` ("-" outside requests and jobs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr with time, level, logger and request id (the gateway's and the supervisor's loggers)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
