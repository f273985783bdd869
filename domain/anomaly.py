"""Streaming anomaly detection on a tenant's hourly spend: `fold(state, charge, partition, offset)`.

Each tenant's charges are summed per UTC hour (of occurred_at). When a charge of a later hour
arrives, the open hour closes: it is scored by river's `GaussianScorer` over the last week of
closed hours (hours without charges count as 0), then learned. An hour whose score reaches the
threshold and whose spend is above the window's mean is reported (`CostAnomalyDetected`): a
dip is no cost alert. The first day of hours only trains the detector (river's grace period).

Why these choices: hourly spend is one number per tenant, which a Gaussian over a rolling week
handles in constant memory and explains in one line (spend, expected, score); the detector is
deterministic, so replaying the log reports the same hours. The detector lives in the state
pickled (river models are plain Python objects), so the Faust table restores it after a crash.
A charge older than the open hour (a late record) is counted in the open hour.

Storage: the open hour changes with every charge, the detector (~6 KB pickled) only when an hour
closes, so the agent stores them apart (`open_hour_json` per charge, `detectors_json` per closed
hour, keyed by `hours_learned`, which names the detector an open hour continues from).
"""

from __future__ import annotations

import base64
import pickle
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from river import anomaly

from domain.pricing import MONEY_PLACES, add
from streams.events import CostAnomalyDetected, TokensCharged

PRODUCER = "agent:cost-anomalies"
WINDOW_HOURS = 168
GRACE_HOURS = 24
THRESHOLD = 0.999
DETECTOR = f"river.anomaly.GaussianScorer(window_size={WINDOW_HOURS}, grace_period={GRACE_HOURS})"
MAX_GAP_HOURS = WINDOW_HOURS  # quiet hours learned as 0 after a gap; more than a window changes nothing
_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)


def hour_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def new_detector() -> anomaly.GaussianScorer:
    return anomaly.GaussianScorer(window_size=WINDOW_HOURS, grace_period=GRACE_HOURS)


@dataclass(frozen=True)
class HourlySpend:
    tenant: str
    currency: str
    hour_start: datetime
    spend: Decimal
    detector: bytes  # the pickled GaussianScorer (what the table stores, base64)
    hours_learned: int = 0
    source_partition: int = -1
    source_offset: int = -1

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "currency": self.currency,
            "hour_start": self.hour_start.isoformat(),
            "spend": str(self.spend),
            "detector": base64.b64encode(self.detector).decode(),
            "hours_learned": self.hours_learned,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HourlySpend:
        return cls(
            **{
                **data,
                "hour_start": datetime.fromisoformat(data["hour_start"]),
                "spend": Decimal(data["spend"]),
                "detector": base64.b64decode(data["detector"]),
            }
        )

    def open_hour_json(self) -> dict[str, Any]:
        """The state without its detector (~200 bytes): what changes with every charge."""
        data = self.to_json()
        del data["detector"]
        return data

    @classmethod
    def from_parts(cls, open_hour: dict[str, Any], detectors: dict[str, str]) -> HourlySpend:
        """Join an open hour with the detector it continues from (`detectors` by hours learned)."""
        return cls.from_json({**open_hour, "detector": detectors[str(open_hour["hours_learned"])]})


def detectors_json(new: HourlySpend, old: HourlySpend | None) -> dict[str, str] | None:
    """The detectors to store when `new` learned hours `old` had not (None: the detector is unchanged).

    Both the new and the previous detector are kept, keyed by hours learned: if a crash persists
    this record but not the open hour written after it, the restored open hour still finds the
    detector it continues from, and the redelivered closing charge learns its hour once.
    """
    if old is not None and old.hours_learned == new.hours_learned:
        return None
    out = {str(new.hours_learned): base64.b64encode(new.detector).decode()}
    if old is not None:
        out[str(old.hours_learned)] = base64.b64encode(old.detector).decode()
    return out


def fold(
    state: HourlySpend | None, charge: TokensCharged, partition: int, offset: int
) -> tuple[HourlySpend, CostAnomalyDetected | None]:
    """Add one charge to its tenant's open hour; when it opens a later hour, score and learn the closed one."""
    hour = hour_of(charge.envelope.occurred_at)
    if state is None:
        start = HourlySpend(charge.tenant, charge.currency, hour, charge.cost, pickle.dumps(new_detector()))
        return replace(start, source_partition=partition, source_offset=offset), None
    if partition == state.source_partition and offset <= state.source_offset:
        return state, None
    if charge.currency != state.currency:
        raise ValueError(
            f"tenant {charge.tenant} charged in {charge.currency}, its spend is watched in {state.currency}"
        )
    if hour <= state.hour_start:
        return replace(
            state, spend=add(state.spend, charge.cost), source_partition=partition, source_offset=offset
        ), None
    detector = pickle.loads(state.detector)  # our own state, from our own table
    closed = float(state.spend)
    expected = _mean(detector)
    score = float(detector.score_one(None, closed))
    detector.learn_one(None, closed)
    learned = state.hours_learned + 1
    gap = min(int((hour - state.hour_start) / timedelta(hours=1)) - 1, MAX_GAP_HOURS)
    for _ in range(gap):  # hours without charges spent nothing
        detector.learn_one(None, 0.0)
    event = None
    if state.hours_learned >= GRACE_HOURS and score >= THRESHOLD and expected is not None and closed > expected:
        event = CostAnomalyDetected(
            envelope=charge.envelope.caused_by("CostAnomalyDetected", PRODUCER, state.hour_start.isoformat()),
            hour_start=state.hour_start,
            spend=state.spend,
            expected=Decimal(expected).quantize(_QUANTUM),
            currency=state.currency,
            score=score,
            threshold=THRESHOLD,
            detector=DETECTOR,
            source_partition=partition,
            source_offset=offset,
        )
    new = HourlySpend(
        tenant=state.tenant,
        currency=state.currency,
        hour_start=hour,
        spend=charge.cost,
        detector=pickle.dumps(detector),
        hours_learned=learned + gap,
        source_partition=partition,
        source_offset=offset,
    )
    return new, event


def _mean(detector: anomaly.GaussianScorer) -> float | None:
    """The mean hourly spend the detector has learned (None before anything was learned)."""
    gaussian = detector.gaussian.obj if hasattr(detector.gaussian, "obj") else detector.gaussian
    n = gaussian.n_samples
    return float(gaussian.mu) if n else None
