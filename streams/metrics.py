"""Prometheus plumbing every side shares: the label-cardinality guard and a scrape endpoint.

Responsible for:
- `BoundedLabel`: the only way a label may take values that a client or the data chooses
  (a tenant, a dead letter's reason). The first `limit` distinct values keep their own
  series; every later one is counted under `OTHER`, so a flood of new tenants adds at most
  one series per family, and the `OTHER` series counts exactly what the others do not;
- `serve`: prometheus_client's HTTP server on a configured port, for processes without a web
  server of their own (the transactional agent workers). A port that is taken is logged and
  skipped: metrics are worth a warning, never a worker that does not start.

Label rule (docs/observability.md): every label is a code-defined enum (route template,
status, outcome, kind), a catalogue name (topic, table, agent) or a partition number;
anything else goes through a `BoundedLabel`.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

OTHER = "_other"
log = logging.getLogger(__name__)


class BoundedLabel:
    """Maps label values to at most `limit` distinct ones; later newcomers share `OTHER`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen or len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


def serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer | None:
    """Serve `registry` at http://host:port/metrics in a daemon thread; None when off (port 0) or taken."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", host, port, exc)
        return None
    return server
