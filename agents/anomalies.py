"""Agent: anomalies in a tenant's hourly spend (CostAnomalyDetected), from TokensCharged.

The pure fold is `domain.anomaly.fold`; the I/O is the shared charge-fold shape
(`agents/charge_folds.py`). The open hour changes with every charge, so the state is stored
every time, not only when an anomaly is emitted.
"""

from __future__ import annotations

from typing import Any

import faust

from agents.charge_folds import register_charge_fold
from domain.anomaly import HourlySpend, fold
from streams.codec import Codec
from streams.topics import Topics

AGENT_NAME = "cost-anomalies"


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
    )
