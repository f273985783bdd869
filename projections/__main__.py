"""`python -m projections`: the read-side process (migrations, sink, read-only SQL endpoint).

Why its own entry point: the store-owning process must be startable on its own (by
`ledgerflow up`, a supervisor or a test) with plain flags, without importing `ledgerflow`.
SIGTERM/SIGINT stop it cleanly: HTTP closes, the sink does a final flush and commit, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import orjson

from domain.keys import KeyStore
from projections.access import ReadAccess, load_or_create_token
from projections.lag import WatchedGroup
from projections.service import ProjectionService, serve
from projections.sink import tune_gc
from streams import telemetry
from streams.topics import DEFAULT_PARTITIONS, Topics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m projections", description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", default="", help="Kafka bootstrap servers (host:port)")
    p.add_argument("--group", default="ledgerflow-sink", help="consumer group of the sink")
    p.add_argument("--topic-prefix", default="ledgerflow.", help="prefix of every topic")
    p.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="partitions of topics it creates")
    p.add_argument("--store", required=True, help="chdb:///abs/path or http(s)://[user:pass@]host:port")
    p.add_argument("--database", default="ledgerflow", help="database holding the projections")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8124, help="HTTP port (0 = any free port, printed at start)")
    p.add_argument("--no-sink", action="store_true", help="serve SQL only, do not consume Kafka")
    p.add_argument("--instance-id", default=None, help="static group membership id: restarts rejoin at once")
    p.add_argument("--batch-max", type=int, default=5000, help="most rows per insert")
    p.add_argument("--batch-ms", type=int, default=200, help="longest wait before a partial batch is inserted")
    p.add_argument("--token-file", type=Path, help="the operator's read token (made, 0600, if missing)")
    p.add_argument("--api-keys-file", type=Path, help="JSON list of static keys [{key_id, tenant, sha256, roles}]")
    p.add_argument(
        "--allow-fault-injection", action="store_true", help="chaos tests: POST /faults/store-outage cuts the store"
    )
    p.add_argument(
        "--lag-group", action="append", default=[], metavar="GROUP=key,...",
        help="sample this consumer group's lag on these catalogue topics (GROUP=* for all); repeatable",
    )  # fmt: skip
    p.add_argument("--lag-interval", type=float, default=0.0, help="seconds between lag samples (0 = off)")
    p.add_argument("--open", action="store_true", help="no authentication at all (a throwaway local store only)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # issue 11: logs and traces; defaults from the LEDGERFLOW_* environment `ledgerflow up` passes on
    env = os.environ.get
    p.add_argument("--log-format", default=env("LEDGERFLOW_LOG_FORMAT", "json"), choices=["json", "text"])
    p.add_argument(
        "--otel-exporter", default=env("LEDGERFLOW_OTEL_EXPORTER", "none"), choices=["none", "console", "otlp", "file"]
    )
    p.add_argument("--otel-endpoint", default=env("LEDGERFLOW_OTEL_ENDPOINT", ""), help="OTLP/HTTP traces URL")
    p.add_argument("--otel-file", default=env("LEDGERFLOW_OTEL_FILE", ""), help="JSON-lines span file")
    p.add_argument("--otel-sample-ratio", type=float, default=float(env("LEDGERFLOW_OTEL_SAMPLE_RATIO", "1.0")))
    args = p.parse_args(argv)
    if not args.no_sink and not args.bootstrap:
        p.error("--bootstrap is required unless --no-sink")
    if not args.open and args.token_file is None:
        p.error("pass --token-file (the operator's read token; tenant keys come from Kafka) or --open")
    return args


def access_of(args: argparse.Namespace) -> ReadAccess:
    """Who may read: the operator's token from its file, tenant keys from a static file (+ Kafka)."""
    if args.open:
        return ReadAccess.open()
    keys = KeyStore()
    if args.api_keys_file is not None:
        for k in orjson.loads(args.api_keys_file.read_bytes()):
            keys.add(k["key_id"], k["tenant"], k["sha256"], k.get("roles", ["user"]))
    return ReadAccess(load_or_create_token(args.token_file), keys)


async def _main(args: argparse.Namespace) -> None:
    topics = Topics(args.topic_prefix, args.partitions)
    tune_gc()  # the sink and replays are this process's hot path (see projections.sink.tune_gc)
    service = ProjectionService(
        store_url=args.store,
        database=args.database,
        bootstrap=args.bootstrap,
        group=args.group,
        topics=topics,
        run_sink=not args.no_sink,
        batch_max=args.batch_max,
        batch_ms=args.batch_ms,
        instance_id=args.instance_id,
        access=access_of(args),
        fault_injection=args.allow_fault_injection,
        lag_groups=[WatchedGroup.parse(spec, topics) for spec in args.lag_group],
        lag_interval_s=args.lag_interval,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(service, args.host, args.port, stop)
    finally:
        # Blocking on purpose: the sink's final flush and commit must finish before exit.
        await loop.run_in_executor(None, service.stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    telemetry.setup_logging("projections", args.log_level, args.log_format)
    telemetry.configure(
        telemetry.TelemetryConfig(
            "ledgerflow-projections", args.otel_exporter, args.otel_endpoint, args.otel_file, args.otel_sample_ratio
        )
    )
    try:
        asyncio.run(_main(args))
    except Exception as exc:  # a broken store or an edited migration: say why, exit non-zero
        logging.getLogger("projections").error("projections service failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
