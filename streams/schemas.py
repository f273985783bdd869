"""Loads `schemas/avro/*.avsc`, the single source of truth for every event.

Each event schema names `ledgerflow.events.Envelope`; we inline the envelope so each event
has one self-contained schema whose parsing canonical form gives the fingerprint used in
the single-object encoding header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas" / "avro"
ENVELOPE_NAME = "ledgerflow.events.Envelope"


@dataclass(frozen=True)
class EventSchema:
    name: str  # short record name, e.g. TokensCharged
    raw: dict[str, Any]  # envelope inlined
    parsed: Any  # fastavro parsed schema
    fingerprint: bytes  # CRC-64-AVRO of the canonical form, 8 bytes little-endian


def _inline_envelope(raw: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    fields = [dict(f, type=envelope) if f["type"] == ENVELOPE_NAME else f for f in raw["fields"]]
    return dict(raw, fields=fields)


def build(raw: dict[str, Any], envelope: dict[str, Any]) -> EventSchema:
    """Make an EventSchema from a raw event schema and the envelope schema."""
    full = _inline_envelope(raw, envelope)
    parsed = parse_schema(full)
    canonical = to_parsing_canonical_form(full)
    fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")
    return EventSchema(name=raw["name"], raw=full, parsed=parsed, fingerprint=fp)


@cache
def load_all(directory: Path = SCHEMA_DIR) -> dict[str, EventSchema]:
    """Every event schema in `directory`, by short record name."""
    envelope = json.loads((directory / "Envelope.avsc").read_text())
    out: dict[str, EventSchema] = {}
    for path in sorted(directory.glob("*.avsc")):
        if path.name == "Envelope.avsc":
            continue
        raw = json.loads(path.read_text())
        out[raw["name"]] = build(raw, envelope)
    return out
