"""The ClickHouse verifier (`audit.verify_store_sql`) against the Python one, on real chDB.

ClickHouse rebuilds the canonical bytes of every entry and audit record from the projection's
columns and hashes them; on a sound chain it must agree with domain.ledger byte for byte (so
the chain is never handed back to Python), and on every tampered chain it must notice (the
chain is handed to Python, which names the first bad seq): the reports are then equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from domain.checkpoint import SigningKey, generate_key
from domain.ledger import ChainState, chain, entry_bytes, make_checkpoint
from ledgerflow import audit
from projections.schema import columns_for, event_to_row, table_for
from streams.events import AuditRecorded, Envelope, Event
from streams.ids import derived_uuid7

T0 = datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC)
ROOT = "01a2254e-858f-76ea-bab1-95608768fad3"
# strings orjson writes in ways worth checking: quotes, backslashes, unicode, U+2028, emoji, json-ish text
TRICKY = ['say "hi"', "back\\slash", "naïve café", "line\u2028sep", "😀 ok", '{"a":[1,2]}', "", "/slash/"]


def audit_record(tenant: str, i: int) -> AuditRecorded:
    eid = str(derived_uuid7(ROOT, tenant, str(i)))
    text = TRICKY[i % len(TRICKY)]
    at = T0 + timedelta(seconds=i) if i % 5 else T0.replace(microsecond=0) + timedelta(seconds=i)  # .000000 too
    return AuditRecorded(
        envelope=Envelope(
            event_id=eid, event_type="AuditRecorded", schema_version=1, tenant=tenant, occurred_at=at,
            correlation_id=eid, producer="gateway", trace_parent=None if i % 2 else f"00-{i:032x}-{i:016x}-01",
            causation_id=None if i % 3 else str(derived_uuid7(ROOT, "cause", str(i))),
        ),
        action="request.completed", actor=f"key-{text}", subject=text, outcome="success" if i % 4 else "denied",
        details={} if i % 7 == 0 else {"model": "sim", "note": text, "zeta": str(i), "Émoji😀": text, "a\\b": "q"},
    )  # fmt: skip


def chain_events(tenant: str, n: int, key: SigningKey, every: int = 10) -> list[Event]:
    state: ChainState | None = None
    out: list[Event] = []
    for i in range(n):
        rec = audit_record(tenant, i)
        state, entry = chain(state, rec, 0, i)
        assert entry is not None
        out += [rec, entry]
        if state.size % every == 0:
            state, cp = make_checkpoint(state, key, f"ledgerflow.test/{tenant}")
            out.append(cp)
    return out


@pytest.fixture
def key() -> SigningKey:
    return generate_key("ledgerflow.test")


@pytest.fixture
def loaded(store: Client, key: SigningKey) -> Iterator[Client]:
    rows: dict[str, tuple[tuple[str, ...], list[Any]]] = {}
    for i, e in enumerate(
        chain_events("acme", 45, key) + chain_events("globex", 30, key) + chain_events("o'neil", 7, key)
    ):
        cols, out = rows.setdefault(table_for(e.event_type), (columns_for(e.event_type), []))
        out.append(event_to_row(e, "t", 0, i))
    for table, (cols, out) in rows.items():
        store.insert(table, out, column_names=cols)
    yield store


def both(client: Client, key: SigningKey, tenant: str | None = None) -> tuple[Any, Any, list[str]]:
    fast, slow = audit.verify_store_sql(client, key.verifier, tenant)
    return fast, audit.verify(audit.from_store(client, tenant), key.verifier), slow


def test_sound_chains_are_verified_by_clickhouse_alone_with_the_python_verifiers_reports(
    loaded: Client, key: SigningKey
) -> None:
    fast, python, slow = both(loaded, key)
    assert slow == []  # every canonical byte string ClickHouse built hashed as orjson's did
    assert fast == python
    assert [(r.tenant, r.ok, r.size, r.checkpoints_checked) for r in fast] == [
        ("acme", True, 45, 4), ("globex", True, 30, 3), ("o'neil", True, 7, 0),
    ]  # fmt: skip
    fast, python, slow = both(loaded, key, "globex")
    assert (fast, slow) == (python, []) and len(fast) == 1


_A, _E, _C = (f"ALTER TABLE {t} " for t in ("audit_recorded", "ledger_entry_chained", "ledger_checkpoint_signed"))
_ACME = "WHERE tenant = 'acme'"
TAMPER = {
    "audit field": (f"{_A}UPDATE actor = 'mallory' {_ACME} AND subject = ''", 6),
    "audit details": (f"{_A}UPDATE details = map('model', 'x') {_ACME}", 0),
    "audit trace": (f"{_A}UPDATE trace_parent = 'x' {_ACME} AND subject = 'back\\\\slash'", 1),
    "audit deleted": (f"{_A}DELETE {_ACME} AND subject = '😀 ok'", 4),
    "entry deleted": (f"{_E}DELETE {_ACME} AND seq = 30", 30),
    "entry hash": (f"{_E}UPDATE entry_hash = repeat('a', 64) {_ACME} AND seq = 12", 12),
    "reordered": (  # entries 20 and 24 swap places (seq is a key column: copy, then drop the originals)
        "INSERT INTO ledger_entry_chained SELECT * REPLACE (44 - seq AS seq, _offset + 1000000 AS _offset) "
        f"FROM ledger_entry_chained {_ACME} AND seq IN (20, 24);"
        f"{_E}DELETE {_ACME} AND seq IN (20, 24) AND _offset < 1000000", 20,
    ),
    "audit sha": (f"{_E}UPDATE audit_sha256 = repeat('b', 64) {_ACME} AND seq = 3", 3),
    "checkpoint root": (f"{_C}UPDATE root_hash = repeat('c', 64) {_ACME} AND tree_size = 20", 10),
    "truncated": (f"{_E}DELETE {_ACME} AND seq >= 35", 35),
    "control character": (f"{_A}UPDATE actor = 'a\\nb' {_ACME} AND subject = ''", 6),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampering_is_noticed_by_clickhouse_and_named_as_python_names_it(
    loaded: Client, key: SigningKey, case: str
) -> None:
    sql, bad_seq = TAMPER[case]
    for statement in sql.split(";"):
        loaded.command(statement, settings={"mutations_sync": 2})
    fast, python, slow = both(loaded, key)
    assert slow == ["acme"], slow  # ClickHouse saw it (and left the other chains to itself)
    assert fast == python
    acme = next(r for r in fast if r.tenant == "acme")
    assert (acme.ok, acme.bad_seq) == (False, bad_seq), acme


def test_an_entry_citing_no_audit_record_is_never_sound(loaded: Client, key: SigningKey) -> None:
    """A forged last entry (after the last checkpoint) citing an empty audit hash, its record deleted:
    its own hash recomputes, so only the missing audit record gives it away (a LEFT JOIN's default
    '' must not match the forged '')."""
    row = loaded.query(
        "SELECT prev_hash, audit_event_id FROM ledger_entry_chained WHERE tenant = 'acme' AND seq = 44"
    ).result_rows[0]
    forged = hashlib.sha256(entry_bytes("acme", 44, row[0], row[1], "")).hexdigest()
    loaded.command(
        "ALTER TABLE ledger_entry_chained UPDATE entry_hash = {h:String}, audit_sha256 = '' "
        "WHERE tenant = 'acme' AND seq = 44",
        parameters={"h": forged},
        settings={"mutations_sync": 2},
    )
    loaded.command(
        "ALTER TABLE audit_recorded DELETE WHERE tenant = 'acme' AND event_id = {e:String}",
        parameters={"e": row[1]},
        settings={"mutations_sync": 2},
    )
    fast, python, slow = both(loaded, key)
    assert slow == ["acme"] and fast == python
    acme = next(r for r in fast if r.tenant == "acme")
    assert (acme.ok, acme.bad_seq) == (False, 44), acme
