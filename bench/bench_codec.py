"""Codec throughput: decodes/s of a typical TokensCharged, beside orjson on the same payload.

Run: .venv/bin/python bench/bench_codec.py [--seconds 3] [--rounds 12]
Single process, single thread (one core). Prints a Markdown table for BENCHMARKS.md.

Each row calls one function over a list of 1,000 inputs (no lambda in the loop, the same for
every row). The rows run in interleaved rounds (every row once per round, `--seconds` per row
in all), so a noisy neighbour hits them alike; ops/s is the median round, "best" the fastest.
Rows:
- the compiled decoder on the one payload of `typical_charge()`;
- the compiled decoder on 1,000 distinct charges (ids, times, tenants, models, token counts,
  costs all vary as in a stream), so no cache inside the decoder can make the figure;
- the previous decoder: fastavro's schemaless_reader, then the dataclasses (`Codec(fast=False)`);
- encode; orjson.loads / orjson.dumps of the same record as JSON (no validation, dicts only).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.codec import Codec, money
from streams.events import Envelope, TokensCharged
from streams.ids import derived_uuid7, uuid7

BATCH = 1000
PRICES = {  # model → (input, output) per million tokens
    "sim-small": (Decimal("0.15"), Decimal("0.60")),
    "sim-medium": (Decimal("1.10"), Decimal("4.40")),
    "sim-large": (Decimal("3.00"), Decimal("15.00")),
    "sim-embed": (Decimal("0.02"), Decimal("0")),
}


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


def stream_of_charges(n: int, seed: int = 3) -> list[TokensCharged]:
    """`n` distinct charges as a gateway would emit them over ~10 s: 20 tenants, 4 models."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(minutes=5)
    out = []
    for i in range(n):
        at = start + timedelta(microseconds=i * 10_000 + rng.randrange(10_000))
        rid = str(uuid7(int(at.timestamp() * 1000)))
        model = rng.choice(list(PRICES))
        inp, outp = PRICES[model]
        prompt, completion = rng.randint(1, 8000), rng.randint(0, 2000)
        out.append(
            TokensCharged(
                envelope=Envelope(
                    event_id=str(derived_uuid7(rid, "TokensCharged")),
                    event_type="TokensCharged",
                    schema_version=1,
                    tenant=f"tenant-{rng.randrange(20):02d}",
                    occurred_at=at,
                    correlation_id=rid,
                    causation_id=str(derived_uuid7(rid, "PolicyDecided")),
                    trace_parent=f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01",
                    producer="gateway",
                ),
                request_id=rid,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                input_price_per_mtok=money(inp),
                output_price_per_mtok=money(outp),
                price_list_version="sim-2026-11",
                currency="USD",
                cost=money((prompt * inp + completion * outp) / Decimal(1_000_000)),
            )
        )
    return out


def one_round(fn: Callable[[Any], object], inputs: Sequence[Any], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for x in inputs:
            fn(x)
        n += len(inputs)
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row, over all rounds")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    codec, reference = Codec(), Codec(fast=False)
    event = typical_charge()
    avro = codec.encode(event)
    record = event.to_record()
    json_bytes = orjson.dumps(record, default=str)
    stream = stream_of_charges(BATCH)
    stream_avro = [codec.encode(e) for e in stream]
    stream_json = [orjson.dumps(e.to_record(), default=str) for e in stream]
    for data, e in zip(stream_avro, stream, strict=True):  # the fast path gives what the old one gave
        assert codec.decode(data) == reference.decode(data) == e
    assert codec.decode(avro) == reference.decode(avro) == event

    same = [avro] * BATCH
    rows: list[tuple[str, int, Callable[[Any], object], Sequence[Any]]] = [
        ("codec.decode (Avro single-object → validated TokensCharged)", len(avro), codec.decode, same),
        (
            "codec.decode, 1,000 distinct charges in turn",
            round(statistics.mean(map(len, stream_avro))),
            codec.decode,
            stream_avro,
        ),
        ("previous decode: fastavro schemaless_reader + dataclasses", len(avro), reference.decode, same),
        ("codec.encode (TokensCharged → Avro single-object)", len(avro), codec.encode, [event] * BATCH),
        (
            "orjson.loads (same record as JSON → dict, no validation)",
            len(json_bytes),
            orjson.loads,
            [json_bytes] * BATCH,
        ),
        (
            "orjson.loads, the 1,000 distinct charges as JSON",
            round(statistics.mean(map(len, stream_json))),
            orjson.loads,
            stream_json,
        ),
        (
            "orjson.dumps (same record → JSON)",
            len(json_bytes),
            lambda r: orjson.dumps(r, default=str),
            [record] * BATCH,
        ),
    ]
    per_round = args.seconds / args.rounds
    rates: list[list[float]] = [[] for _ in rows]
    for _ in range(args.rounds):
        for i, (_, _, fn, inputs) in enumerate(rows):
            rates[i].append(one_round(fn, inputs, per_round))
    medians = [statistics.median(r) for r in rates]
    base = medians[4]
    print(
        f"python {platform.python_version()}, {platform.machine()}, {args.seconds:g} s per row "
        f"in {args.rounds} interleaved rounds; ops/s is the median round\n"
    )
    print("| operation | bytes | ops/s | best round | vs orjson.loads |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (name, size, _, _), median, r in zip(rows, medians, rates, strict=True):
        print(f"| {name} | {size} | {median:,.0f} | {max(r):,.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
