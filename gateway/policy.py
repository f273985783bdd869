"""The replica's policy decision point: the engine in force, kept current from the log.

Why here: every gateway replica must decide with the same bundle and attributes, and must
never ask anything over the network on the request path. So each replica follows the
compacted `policy-bundles` and `policy-attributes` topics (`streams.follower`) and folds
them into one `domain.policy.PolicyEngine`, which swaps bundle, attributes and shadow
atomically; a decision is pure CPU against pre-parsed Cedar (no parse per request).

Rules of the fold:
- bundles: the active bundle is the LAST record of `policy-bundles` (a rollback re-publishes
  an earlier text as the newest record). A record that does not validate (it cannot come
  from `ledgerflow policy publish`, which refuses it) is logged and skipped: the replica
  keeps the bundle it had, never a half-loaded one;
- the shadow bundle is the record whose version is `policy_shadow_version`, when present;
- attributes: each `PolicyAttributesSet` replaces (or deletes) one entity; a record that does
  not fit the schema is logged and skipped;
- a record older than one already applied for the same key (version, entity) is skipped:
  the follower re-reads the topics from offset 0 when it reconnects, and replaying old
  records must not swap an old bundle or old attributes back in, even for a moment. Event
  ids are time-ordered (UUIDv7, the envelope contract), so "older" is an earlier millisecond;
  within the newest millisecond of a key, the ids already applied are remembered;
- while the follower replays the topics at start, records are buffered and folded once when
  it has caught up (one parse of the newest bundle, one attribute fold), instead of one swap
  per historical record; after that every record takes effect as it arrives (~100 ms poll),
  which is the "hot swap within 1 s".

Model residency: the router may only use models whose region an obligation permits, and a
residency policy compares `context.model.region` with a jurisdiction such as "eu". The
registry names data-centre regions ("eu-west"), so every registry model the store does not
know is seeded as a Model entity with its jurisdiction (`jurisdiction("eu-west") == "eu"`)
and its adapter as provider. Published Model attributes win over the seed; deleting one
falls back to the seed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from domain.policy import (
    AttributeChange,
    AttributesInvalid,
    BundleInvalid,
    Decision,
    DecisionInput,
    Divergence,
    EntityStore,
    PolicyBundle,
    PolicyEngine,
    allowed_models,
    default_bundle,
    fold_attributes,
)
from streams.events import Event, PolicyAttributesSet, PolicyPublished
from streams.follower import StateFollower
from streams.ids import uuid7_millis

log = logging.getLogger(__name__)

UNKNOWN_REGION = "unknown"


def jurisdiction(region: str) -> str:
    """The residency zone of a registry region: its first dash-separated part ("eu-west" → "eu").

    Residency is a legal boundary (the EU), not a data centre; policies name the zone, the
    registry names the data centre. A zone without a dash is its own jurisdiction.
    """
    return region.strip().lower().split("-", 1)[0] or UNKNOWN_REGION


@dataclass(frozen=True, slots=True)
class ModelSeed:
    """What the registry says about a model, as a Model entity's attributes."""

    name: str
    region: str  # a jurisdiction, e.g. "eu"
    provider: str

    def change(self) -> AttributeChange:
        return AttributeChange("Model", self.name, {"region": self.region, "provider": self.provider})


def seeds_from_regions(models: Mapping[str, tuple[str, str]]) -> list[ModelSeed]:
    """Seeds from {model: (registry region, adapter name)}, regions mapped to jurisdictions."""
    return [ModelSeed(name, jurisdiction(region), provider) for name, (region, provider) in models.items()]


@dataclass
class _Newest:
    ms: int
    ids: set[str]


@dataclass
class _Pending:
    bundles: list[PolicyPublished]
    attributes: list[PolicyAttributesSet]


class PolicyPoint:
    """One replica's decision point: a `PolicyEngine` plus (optionally) the follower that feeds it.

    Writes (follower records, `apply_event` in tests) are serialised by one lock; decisions
    read the engine's snapshot without any lock.
    """

    def __init__(
        self,
        bundle: PolicyBundle | None = None,
        *,
        seeds: Iterable[ModelSeed] = (),
        shadow_version: str = "",
        store: EntityStore | None = None,
        memo_size: int = 4096,
    ) -> None:
        self.seeds: tuple[ModelSeed, ...] = tuple(seeds)
        self.shadow_version = shadow_version
        self._lock = threading.Lock()
        self._published: dict[str, PolicyPublished] = {}  # newest record per version
        self._newest: dict[str, _Newest] = {}  # record key → its newest millisecond and the ids applied in it
        self._parsed: dict[tuple[str, str], PolicyBundle] = {}  # (version, sha) → bundle, parsed once
        self._pending = _Pending([], [])
        self._live = True  # False while a follower replays the topics at start
        self._follower: StateFollower | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.loaded = threading.Event()
        self.loaded.set()
        self.refused_bundles = 0
        self.refused_attributes = 0
        self.engine = PolicyEngine(bundle or default_bundle(), self._seeded(store or EntityStore()))
        # Decisions are a pure function of (snapshot, input): remembered per snapshot (see `decide`).
        self._memo: OrderedDict[DecisionInput, tuple[Decision, Divergence | None]] = OrderedDict()
        self._memo_of: object = None
        self.memo_size = memo_size

    # --- following the log ------------------------------------------------------------

    def follow(self, bootstrap: str, bundles_topic: str, attributes_topic: str) -> None:
        """Feed the engine from the two compacted topics (call before `start`)."""
        self._live = False
        self.loaded.clear()
        self._follower = StateFollower(bootstrap, [bundles_topic, attributes_topic], self.apply_event, name="policy")

    def start(self) -> None:
        if self._follower is None:
            return
        self._follower.start()
        self._watcher = threading.Thread(target=self._go_live, name="policy-loaded", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.close()
        if self._watcher is not None:
            self._watcher.join(5.0)

    def _go_live(self) -> None:
        assert self._follower is not None
        while not self._stop.is_set():
            if self._follower.loaded.wait(0.2):
                with self._lock:
                    self._flush()
                    self._live = True
                self.loaded.set()
                log.info(
                    "policy loaded: bundle %s, %d entities, shadow %s",
                    self.engine.policy_version,
                    len(self.engine.store),
                    self.engine.shadow.version if self.engine.shadow else "none",
                )
                return

    def apply_event(self, event: Event) -> None:
        """The follower's callback (also used directly by tests): one state record."""
        if not isinstance(event, PolicyPublished | PolicyAttributesSet):
            return
        key = f"bundle:{event.version}" if isinstance(event, PolicyPublished) else f"entity:{event.entity_key}"
        with self._lock:
            if not self._is_new(key, event.envelope.event_id):
                return  # a replayed record: what it says was applied, or superseded
            if isinstance(event, PolicyPublished):
                self._pending.bundles.append(event)
            else:
                self._pending.attributes.append(event)
            if self._live:
                self._flush()

    def _is_new(self, key: str, event_id: str) -> bool:
        """True (and remembered) unless the record was applied already or a later one for `key` was."""
        try:
            ms = uuid7_millis(event_id)
        except ValueError:  # not a UUID: only an exact repeat can be recognised
            ms = -1
        newest = self._newest.get(key)
        if newest is None or ms > newest.ms:
            self._newest[key] = _Newest(ms, {event_id})
            return True
        if ms < newest.ms or event_id in newest.ids:
            return False
        newest.ids.add(event_id)
        return True

    def _flush(self) -> None:
        """Fold what is pending into one new engine snapshot. Caller holds the lock."""
        bundles, attributes = self._pending.bundles, self._pending.attributes
        self._pending = _Pending([], [])
        if not bundles and not attributes:
            return
        changes: list[AttributeChange] = []
        for rec in attributes:
            try:
                changes.append(
                    AttributeChange.from_json(rec.entity_type, rec.entity_id, rec.attributes_json, rec.deleted)
                )
            except AttributesInvalid as bad:
                self.refused_attributes += 1
                log.error("policy attributes record %s skipped: %s", rec.envelope.event_id, bad)
        store = self.engine.store
        if changes:
            store, rejected = fold_attributes(store, changes)
            for change, exc in rejected:
                self.refused_attributes += 1
                log.error("policy attributes of %s::%s skipped: %s", change.entity_type, change.entity_id, exc)
            store = self._seeded(store)
        active: PolicyBundle | None = None
        for pub in bundles:
            self._published[pub.version] = pub
        for pub in reversed(bundles):  # the newest valid record is the active bundle
            active = self._bundle_of(pub)
            if active is not None:
                break
        shadow = self._shadow_bundle()
        self.engine.swap(
            bundle=active if active is not None else self.engine.bundle,
            store=store,
            shadow=shadow,
        )
        if active is not None:
            log.info("policy bundle %s (%s) active", active.version, active.content_sha256[:12])

    def _bundle_of(self, rec: PolicyPublished) -> PolicyBundle | None:
        key = (rec.version, rec.content_sha256)
        found = self._parsed.get(key)
        if found is not None:
            return found
        try:
            bundle = PolicyBundle.from_published(rec.version, rec.bundle, rec.content_sha256)
        except BundleInvalid as exc:
            self.refused_bundles += 1
            log.error("policy bundle record %s refused, keeping the bundle in force: %s", rec.envelope.event_id, exc)
            return None
        self._parsed[key] = bundle
        return bundle

    def _shadow_bundle(self) -> PolicyBundle | None:
        if not self.shadow_version:
            return None
        rec = self._published.get(self.shadow_version)
        return self._bundle_of(rec) if rec is not None else None

    def _seeded(self, store: EntityStore) -> EntityStore:
        """The store with every registry model it does not hold added from the seeds."""
        missing = [s.change() for s in self.seeds if store.get("Model", s.name) is None]
        if not missing:
            return store
        seeded, rejected = fold_attributes(store, missing)
        for change, exc in rejected:
            log.error("model seed %s refused: %s", change.entity_id, exc)
        return seeded

    # --- deciding ---------------------------------------------------------------------

    @property
    def policy_version(self) -> str:
        return self.engine.policy_version

    def decide(self, inp: DecisionInput) -> tuple[Decision, Divergence | None]:
        """The enforced decision and, with a shadow bundle in force, how it would have differed.

        Why a memo: a Cedar evaluation is most of the gateway's CPU per request, and a decision
        depends only on the engine snapshot (bundle, attributes, shadow) and the input, so
        repeated inputs (same tenant, principal, model, tools, classification and estimated cost)
        reuse it. The memo is dropped whenever the snapshot changes, so a hot swap is never
        shadowed by an old decision; it holds `memo_size` inputs, least recently used first out.
        Called on the event loop only (no lock).
        """
        snap = self.engine.snapshot
        if snap is not self._memo_of:
            self._memo.clear()
            self._memo_of = snap
        found = self._memo.get(inp)
        if found is not None:
            self._memo.move_to_end(inp)
            return found
        out = self.engine.decide_with_shadow(inp)
        if self.memo_size:
            self._memo[inp] = out
            if len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return out

    def principal_region(self, principal: str) -> str:
        """The principal's stored region, or "" (the engine then leaves it empty)."""
        stored = self.engine.store.get("Principal", principal)
        region = stored.get("region") if stored is not None else None
        return region if isinstance(region, str) else ""

    def model_region(self, model: str) -> str:
        stored = self.engine.store.get("Model", model)
        region = stored.get("region") if stored is not None else None
        return region if isinstance(region, str) else UNKNOWN_REGION

    def allowed_models(self, decision: Decision, candidates: Iterable[str]) -> list[str]:
        """The candidates (in order) whose region the decision's obligations permit."""
        store = self.engine.store
        pairs = []
        for name in candidates:
            stored = store.get("Model", name)
            region = stored.get("region") if stored is not None else None
            pairs.append((name, region if isinstance(region, str) else UNKNOWN_REGION))
        return allowed_models(decision, pairs)
