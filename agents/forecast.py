"""Agent: month-end spend forecast per monthly budget (SpendForecasted, BudgetVarianceAlerted), from BudgetSettled.

The pure fold is `domain.forecast.fold`; the I/O is the shared charge-fold shape
(`agents/charge_folds.py`) over the budget-holds topic (keyed by tenant, like the charges), whose
settles carry the spend counted against each budget and the limit in force. Why settles and not
charges: a settle is already scoped to its budget (tenant or API key, soft or hard) and carries
its limit, so the forecast is one ordered input per budget and a replay emits the same events.
"""

from __future__ import annotations

from typing import Any

import faust

from agents.charge_folds import register_charge_fold
from domain.forecast import BudgetMonth, fold, key_of
from streams.codec import Codec
from streams.events import BudgetSettled
from streams.topics import Topics

AGENT_NAME = "spend-forecasts"


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    return register_charge_fold(
        app,
        topics,
        codec,
        name=AGENT_NAME,
        derived_topic="spend-forecasts",
        key_of=key_of,
        load=BudgetMonth.from_json,
        fold=fold,
        store_every_charge=True,  # the month to date changes with every settle, a forecast only on change
        source_topic="budget-holds",
        accepts=BudgetSettled,
    )
