"""Agent: per-tenant, per-UTC-day, per-model savings rollups (SavingsSnapshotted), from TokensCharged.

The pure fold is `domain.rollups.fold`; the I/O is the shared charge-fold shape
(`agents/charge_folds.py`). Every snapshot carries its key's full totals.
"""

from __future__ import annotations

from typing import Any

import faust

from agents.charge_folds import register_charge_fold
from domain.rollups import DailyTotals, fold, key_of
from streams.codec import Codec
from streams.topics import Topics

AGENT_NAME = "savings-rollups"


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    return register_charge_fold(
        app,
        topics,
        codec,
        name=AGENT_NAME,
        derived_topic="savings-snapshots",
        key_of=key_of,
        load=DailyTotals.from_json,
        fold=fold,
    )
