"""Codec throughput: decodes/s of a typical TokensCharged, beside orjson on the same payload.

Run: .venv/bin/python bench/bench_codec.py [--seconds 3]
Single process, single thread (one core). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.codec import Codec
from streams.events import Envelope, TokensCharged
from streams.ids import derived_uuid7, uuid7


def typical_charge() -> TokensCharged:
    rid = str(uuid7())
    return TokensCharged(
        envelope=Envelope(
            event_id=str(derived_uuid7(rid, "TokensCharged")),
            event_type="TokensCharged",
            schema_version=1,
            tenant="acme-corp",
            occurred_at=datetime.now(UTC),
            correlation_id=rid,
            causation_id=str(derived_uuid7(rid, "PolicyDecided")),
            trace_parent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            producer="gateway",
        ),
        request_id=rid,
        model="sim-small",
        prompt_tokens=812,
        completion_tokens=233,
        input_price_per_mtok=Decimal("0.15"),
        output_price_per_mtok=Decimal("0.60"),
        price_list_version="sim-2026-11",
        currency="USD",
        cost=Decimal("0.000261600000"),
    )


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    codec = Codec()
    event = typical_charge()
    avro = codec.encode(event)
    record = event.to_record()
    json_bytes = orjson.dumps(record, default=str)
    rows = [
        (
            "codec.decode (Avro single-object → validated TokensCharged)",
            len(avro),
            rate(lambda: codec.decode(avro), args.seconds),
        ),
        (
            "codec.encode (TokensCharged → Avro single-object)",
            len(avro),
            rate(lambda: codec.encode(event), args.seconds),
        ),
        (
            "orjson.loads (same record as JSON → dict, no validation)",
            len(json_bytes),
            rate(lambda: orjson.loads(json_bytes), args.seconds),
        ),
        (
            "orjson.dumps (same record → JSON)",
            len(json_bytes),
            rate(lambda: orjson.dumps(record, default=str), args.seconds),
        ),
    ]
    base = rows[2][2]
    print(f"python {platform.python_version()}, {platform.machine()}, {args.seconds:.0f} s per row\n")
    print("| operation | bytes | ops/s | vs orjson.loads |")
    print("| --- | ---: | ---: | ---: |")
    for name, size, r in rows:
        print(f"| {name} | {size} | {r:,.0f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
