"""ABAC attributes: the entity store the policy engine evaluates against, as a pure fold.

Attributes reach every replica as `PolicyAttributesSet` events on a compacted topic, one
record per entity (the newest is the entity's state). `apply_attributes(store, change)` folds
one record into a new immutable `EntityStore`; replaying the topic from the start rebuilds
the same store on every replica (`digest` says so without comparing contents).

Why validate here: a record that does not fit the schema would make Cedar refuse the whole
entity set at decision time. So each record is checked against the attribute types of the
platform schema when it is folded (unknown type or attribute, wrong value type, a missing
required attribute) and refused alone with `AttributesInvalid`; `fold_attributes` skips and
reports such records so one bad record never stops a replica.

A set record replaces the entity's attributes as a whole (compaction keeps only the newest
record, so a partial update could not be replayed). Principals are special: the engine
completes them from the authenticated request (tenant, region, roles), so every Principal
attribute is optional in the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache, cached_property
from types import MappingProxyType
from typing import Any

from domain.policy_bundle import NAMESPACE, schema_json

#: Kinds whose every attribute the engine can fill from the request.
ENGINE_COMPLETED = frozenset({"Principal"})
CEDAR_DECIMAL_PLACES = 4
CEDAR_DECIMAL_MAX = Decimal("922337203685477.5807")
_CEDAR_QUANTUM = Decimal(1).scaleb(-CEDAR_DECIMAL_PLACES)

AttrValue = str | int | bool | Decimal | tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class AttrType:
    """One attribute's type, as the schema declares it: String, Long, Boolean, decimal, or Set of them."""

    kind: str
    required: bool = True
    element: AttrType | None = None


@cache
def entity_attribute_types() -> Mapping[str, Mapping[str, AttrType]]:
    """Attribute types per entity kind, read from the platform schema (one source of truth)."""
    doc = json.loads(schema_json())[NAMESPACE]
    common = doc.get("commonTypes", {})
    out: dict[str, Mapping[str, AttrType]] = {}
    for kind, spec in doc["entityTypes"].items():
        attrs = (spec.get("shape") or {}).get("attributes", {})
        out[kind] = MappingProxyType({name: _attr_type(t, common) for name, t in attrs.items()})
    return MappingProxyType(out)


def _attr_type(spec: Mapping[str, Any], common: Mapping[str, Any]) -> AttrType:
    required = spec.get("required", True)
    kind = spec["type"]
    if kind in common:
        return _attr_type({**common[kind], "required": required}, common)
    if kind in ("String", "Long", "Boolean"):
        return AttrType(kind, required)
    if kind == "Extension" and spec.get("name") == "decimal":
        return AttrType("decimal", required)
    if kind == "Set":
        element = _attr_type(spec["element"], common)
        if element.kind == "Set":
            raise ValueError("sets of sets are not supported as entity attributes")
        return AttrType("Set", required, element)
    raise ValueError(f"entity attribute type {spec!r} is not supported by the entity store")


class AttributesInvalid(ValueError):
    """An attribute record does not fit the schema; `errors` says every way it does not."""

    def __init__(self, entity_type: str, entity_id: str, errors: Iterable[str]) -> None:
        self.entity_type = entity_type
        self.entity_id = entity_id
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__(f"attributes of {entity_type}::{entity_id!r} refused: " + "; ".join(self.errors))


@dataclass(frozen=True, slots=True)
class AttributeChange:
    """One PolicyAttributesSet record: set an entity's attributes (whole), or delete the entity."""

    entity_type: str
    entity_id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    deleted: bool = False

    @classmethod
    def from_json(
        cls, entity_type: str, entity_id: str, attributes_json: str, deleted: bool = False
    ) -> AttributeChange:
        """From the event's fields; decimals in the JSON stay exact (parsed as Decimal, never float)."""
        if deleted:
            return cls(entity_type, entity_id, {}, True)
        try:
            attrs = json.loads(attributes_json or "{}", parse_float=Decimal)
        except ValueError as exc:
            raise AttributesInvalid(entity_type, entity_id, [f"attributes_json is not JSON: {exc}"]) from None
        if not isinstance(attrs, dict):
            raise AttributesInvalid(entity_type, entity_id, ["attributes_json must be a JSON object"])
        return cls(entity_type, entity_id, attrs, False)

    def attributes_json(self) -> str:
        """The event's attributes_json (canonical: sorted keys, sets as sorted arrays, decimals as strings)."""
        return json.dumps(
            {} if self.deleted else _jsonable(normalize_attributes(self.entity_type, self.entity_id, self.attributes)),
            sort_keys=True,
            separators=(",", ":"),
        )


def normalize_attributes(entity_type: str, entity_id: str, attributes: Mapping[str, Any]) -> dict[str, AttrValue]:
    """Check one entity's attributes against the schema and return them in the store's form.

    The store's form: str, int, bool, Decimal (at most 4 places, Cedar's decimal), and sets as
    sorted tuples without duplicates. Raises AttributesInvalid listing every problem.
    """
    types = entity_attribute_types().get(entity_type)
    if types is None:
        known = sorted(entity_attribute_types())
        raise AttributesInvalid(entity_type, entity_id, [f"unknown entity type {entity_type!r}; known: {known}"])
    errors: list[str] = []
    if not entity_id:
        errors.append("entity id is empty")
    out: dict[str, AttrValue] = {}
    for name, value in attributes.items():
        spec = types.get(name)
        if spec is None:
            errors.append(f"unknown attribute {name!r} (known: {sorted(types)})")
            continue
        try:
            out[name] = _convert(value, spec)
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
    if entity_type not in ENGINE_COMPLETED:
        missing = sorted(n for n, t in types.items() if t.required and n not in attributes)
        if missing:
            errors.append(f"missing required attributes {missing}")
    if errors:
        raise AttributesInvalid(entity_type, entity_id, errors)
    return out


def _convert(value: Any, spec: AttrType) -> AttrValue:
    if spec.kind == "String":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value
    if spec.kind == "Boolean":
        if not isinstance(value, bool):
            raise ValueError(f"expected a boolean, got {type(value).__name__}")
        return value
    if spec.kind == "Long":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError("integer out of Cedar's 64-bit range")
        return value
    if spec.kind == "decimal":
        return cedar_decimal(value)
    assert spec.kind == "Set" and spec.element is not None
    if not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"expected an array (a set), got {type(value).__name__}")
    items = {_convert(v, spec.element) for v in value}
    return tuple(sorted(items))  # type: ignore[type-var]


def cedar_decimal(value: Any) -> Decimal:
    """A money-like value as Cedar's decimal can hold it: exact, at most 4 places, in range.

    Floats are refused (money is never float); strings and ints are accepted.
    """
    if isinstance(value, bool | float):
        raise ValueError("decimals must be given as strings or Decimal, never floats")
    d: Decimal | None = None
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int | str):
        try:
            d = Decimal(str(value).strip())
        except InvalidOperation:
            d = None
    if d is None or not d.is_finite():
        raise ValueError(f"{value!r} is not a decimal number")
    if abs(d) > CEDAR_DECIMAL_MAX:
        raise ValueError(f"{value!r} is out of Cedar's decimal range")
    if d != d.quantize(_CEDAR_QUANTUM):
        raise ValueError(f"{value!r} has more than {CEDAR_DECIMAL_PLACES} decimal places (Cedar's decimal)")
    return d


def _jsonable(attrs: Mapping[str, AttrValue]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Decimal) else v) for k, v in attrs.items()}


def cedar_value(value: AttrValue) -> Any:
    """A store value in Cedar's entity JSON form (decimals as `__extn`, sets as arrays)."""
    if isinstance(value, tuple):
        return [cedar_value(v) for v in value]
    if isinstance(value, Decimal):
        return {"__extn": {"fn": "decimal", "arg": format(value.quantize(_CEDAR_QUANTUM), "f")}}
    return value


_EMPTY: Mapping[str, Mapping[str, Mapping[str, AttrValue]]] = MappingProxyType({})


@dataclass(frozen=True)
class EntityStore:
    """Immutable snapshot of every entity's attributes; `version` counts the changes folded in.

    `version` is local to the replica (a replica that starts on a compacted topic folds fewer
    records); `digest` names the contents and is the same on every replica that holds them.
    """

    version: int = 0
    entities: Mapping[str, Mapping[str, Mapping[str, AttrValue]]] = field(default_factory=lambda: _EMPTY, repr=False)

    def get(self, entity_type: str, entity_id: str) -> Mapping[str, AttrValue] | None:
        kind = self.entities.get(entity_type)
        return None if kind is None else kind.get(entity_id)

    def ids(self, entity_type: str) -> tuple[str, ...]:
        return tuple(sorted(self.entities.get(entity_type, {})))

    def __len__(self) -> int:
        return sum(len(v) for v in self.entities.values())

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the contents (not of the version)."""
        doc = {
            kind: {eid: _jsonable(attrs) for eid, attrs in sorted(by_id.items())}
            for kind, by_id in sorted(self.entities.items())
            if by_id
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def apply_attributes(store: EntityStore, change: AttributeChange) -> EntityStore:
    """Fold one attribute record into the store: a new store, or the same one if nothing changed.

    Raises AttributesInvalid (and leaves `store` as it was) when the record does not fit the schema.
    """
    new, rejected = fold_attributes(store, [change])
    if rejected:
        raise rejected[0][1]
    return new


def fold_attributes(
    store: EntityStore, changes: Iterable[AttributeChange]
) -> tuple[EntityStore, list[tuple[AttributeChange, AttributesInvalid]]]:
    """Fold many records at once (replay at start): one copy per touched kind, not per record.

    Invalid records are skipped and returned beside the new store, so the caller can dead-letter
    them while the good ones take effect.
    """
    touched: dict[str, dict[str, Mapping[str, AttrValue]]] = {}
    rejected: list[tuple[AttributeChange, AttributesInvalid]] = []
    version = store.version
    for change in changes:
        try:
            if change.deleted:
                if change.entity_type not in entity_attribute_types():
                    normalize_attributes(change.entity_type, change.entity_id, {})  # raises: unknown kind
                attrs = None
            else:
                attrs = MappingProxyType(normalize_attributes(change.entity_type, change.entity_id, change.attributes))
        except AttributesInvalid as exc:
            rejected.append((change, exc))
            continue
        kind = touched.get(change.entity_type)
        if kind is None:
            kind = touched[change.entity_type] = dict(store.entities.get(change.entity_type, {}))
        current = kind.get(change.entity_id)
        if attrs is None:
            if current is None:
                continue  # deleting what is not there changes nothing
            del kind[change.entity_id]
        else:
            if current is not None and dict(current) == dict(attrs):
                continue  # a replayed or repeated record
            kind[change.entity_id] = attrs
        version += 1
    if version == store.version:
        return store, rejected
    entities = dict(store.entities)
    for name, by_id in touched.items():
        entities[name] = MappingProxyType(by_id)
    return EntityStore(version, MappingProxyType(entities)), rejected
