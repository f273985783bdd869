"""Agent: anomalies in a tenant's hourly spend (CostAnomalyDetected), from TokensCharged.

The pure fold is `domain.anomaly.fold`; the I/O is the shared charge-fold shape
(`agents/charge_folds.py`). The open hour changes with every charge, so it is stored every
time, not only when an anomaly is emitted; the pickled detector (~6 KB) changes only when an
hour closes, so it is stored then, under its own key (`<tenant>|detectors`) in the same table.
Both keys of a tenant are written from its charges' partition, so they share a changelog
partition and a crash can lose the open hour written after the detectors, never the reverse
(`domain.anomaly.detectors_json` keeps the previous detector for that case).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import faust

from agents.charge_folds import register_charge_fold
from domain.anomaly import HourlySpend, detectors_json, fold
from streams.codec import Codec
from streams.topics import Topics

AGENT_NAME = "cost-anomalies"
DETECTORS = "|detectors"


def restore(table: MutableMapping[Any, Any], key: str) -> HourlySpend | None:
    open_hour = table.get(key)
    if not open_hour:
        return None
    if "detector" in open_hour:  # written before detectors had their own key: the whole state
        return HourlySpend.from_json(open_hour)
    return HourlySpend.from_parts(open_hour, table[key + DETECTORS])


def save(table: MutableMapping[Any, Any], key: str, old: HourlySpend | None, new: HourlySpend) -> None:
    detectors = detectors_json(new, old)
    if detectors is None and table.get(key + DETECTORS) is None:  # first save over an old layout
        detectors = detectors_json(new, None)
    if detectors is not None:  # first, so the open hour never names a detector that was lost
        table[key + DETECTORS] = detectors
    table[key] = new.open_hour_json()


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    return register_charge_fold(
        app,
        topics,
        codec,
        name=AGENT_NAME,
        derived_topic="cost-anomalies",
        key_of=lambda charge: charge.tenant,
        load=HourlySpend.from_json,
        fold=fold,
        store_every_charge=True,
        restore=restore,
        save=save,
    )
