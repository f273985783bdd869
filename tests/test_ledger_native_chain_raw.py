"""Hand-built Avro AuditRecorded encodings through both ledger folds (C and Python): overlong
varints, map blocks with negative counts and wrong byte sizes, duplicate and empty detail keys,
invalid UTF-8, schema versions at int32's edges, the 2020 and now + 1 day time edges, trailing
bytes, odd ids and blank or non-ASCII tenants. `fold_both` asserts every outcome equal (from a
review of the C fold, which found none unequal at 1,500 examples; 150 here)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.ledger import _Partition
from tests.test_ledger_native import zigzag
from tests.test_ledger_native_chain import AUDIT_HEADER, NOW, Msg, fold_both

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def string(s: bytes, pad: int = 0) -> bytes:
    return zigzag(len(s), pad) + s


def opt(s: bytes | None, pad: int = 0) -> bytes:
    return zigzag(0, pad) if s is None else zigzag(1, pad) + string(s)


def record(
    *,
    event_id: bytes,
    tenant: bytes,
    occurred_us: int,
    trace: bytes | None,
    corr: bytes,
    cause: bytes | None,
    details_blocks: list[tuple[bool, list[tuple[bytes, bytes]], int]],
    pads: list[int],
    event_type: bytes = b"AuditRecorded",
    schema_version: int = 1,
    tail: bytes = b"",
) -> bytes:
    p = iter(pads + [0] * 40)
    body = b"".join(
        [
            string(event_id, next(p)),
            string(event_type, next(p)),
            zigzag(schema_version, next(p)),
            string(tenant, next(p)),
            zigzag(occurred_us, next(p)),
            opt(trace, next(p)),
            string(corr, next(p)),
            opt(cause, next(p)),
            string(b"gateway", next(p)),
            string(b"request.completed", next(p)),
            string(b"key_1", next(p)),
            string(b"req-1", next(p)),
            string(b"success", next(p)),
        ]
    )
    for negative, items, size_delta in details_blocks:
        payload = b"".join(string(k) + string(v) for k, v in items)
        if negative:
            body += zigzag(-len(items)) + zigzag(len(payload) + size_delta) + payload
        else:
            body += zigzag(len(items)) + payload
    body += zigzag(0) + tail
    return AUDIT_HEADER + body


KEYS = st.sampled_from([b"a", b"b", b"", b"\xc3\xa9", b"z", b"a\x00", b"\x7f", b"model"])
VALS = (
    st.text(max_size=4).map(str.encode)
    | st.text(max_size=4).map(str.encode)
    | st.text(max_size=4).map(str.encode)
    | st.binary(max_size=6)
    | st.sampled_from([b"x", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b'\x1f"\\'])
)
now_us = (NOW - EPOCH) // timedelta(microseconds=1)


@st.composite
def raw_records(draw: st.DrawFn) -> bytes:
    eid = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))).encode()
    if draw(st.integers(0, 9)) == 0:
        eid = draw(st.sampled_from([eid.upper(), eid[:35], eid + b"0", eid.replace(b"-", b"_", 1)]))
    corr = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))).encode()
    if draw(st.integers(0, 4)) == 0:
        corr = corr.upper()
    blocks = draw(
        st.lists(
            st.tuples(
                st.booleans(), st.lists(st.tuples(KEYS, VALS), max_size=4), st.sampled_from([0] * 12 + [1, -1, 100])
            ),
            max_size=3,
        )
    )
    return record(
        event_id=eid,
        tenant=draw(
            st.sampled_from([b"acme", b"initech", b"acme", b"initech", b" x", b"\t", b"\xc2\xa0a", b"\xe3\x80\x80"])
        ),
        occurred_us=draw(
            st.sampled_from([now_us - 10_000_000, now_us, 1577836800000000, 1577836799999999, now_us + 86_400_000_000])
            | st.integers(now_us - 10**9, now_us + 10**6)
        ),
        trace=draw(st.none() | st.binary(max_size=5)),
        corr=corr,
        cause=draw(st.none() | st.just(b"c")),
        details_blocks=blocks,
        pads=draw(st.lists(st.sampled_from([0] * 8 + [1, 2, 3, 5, 9]), max_size=14)),
        schema_version=draw(st.sampled_from([1, 1, 1, 1, 1, 1, 0, -1, 2**31 - 1, 2**31, -(2**31) - 1])),
        tail=draw(st.sampled_from([b""] * 9 + [b"\x00"])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(raw_records(), st.integers(0, 1)), min_size=1, max_size=12), st.integers(1, 4))
def test_raw_encodings(recs: list[tuple[bytes, int]], every_n: int) -> None:
    offs = [0, 0]
    msgs = []
    for value, p in recs:
        msgs.append(Msg(value, p, offs[p]))
        offs[p] += 1
    fold_both([msgs], {0: _Partition(), 1: _Partition()}, every_n, 3600.0)
