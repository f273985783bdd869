"""`ledgerflow policy ...`: Cedar policy bundles and attributes as events, and their dry-run.

    policy publish FILE --version V [--note N]   validate, then publish as the active bundle
    policy list                                  every version on the topic; * marks the active one
    policy rollback VERSION                      re-publish an earlier version's text as the newest record
    policy diff FILE [--last N] [--json]         dry-run FILE against the last N recorded decisions
    policy schema [--json]                       the platform schema policies are validated against
    policy attributes set TYPE ID JSON           set one entity's attributes (whole)
    policy attributes delete TYPE ID             delete one entity

Why this shape: bundles live on the compacted `policy-bundles` topic keyed by version, and the
active bundle is the topic's last record, so rollback is "publish an earlier text again" and
every replica follows the same rule. A bundle is validated (Cedar schema, @id, @obligation)
before anything is produced, so an invalid one is refused with every error and never reaches
the topic. A version is immutable: publishing other content under a published version is
refused, because recorded decisions name their version and must stay reproducible from it.
Every publish and attribute change records its AuditRecorded in the same transaction
(`ledgerflow.admin.publish`), actions `policy.published` and `policy.attributes_set`.
"""

from __future__ import annotations

import getpass
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from domain.policy import (
    DEFAULT_BUNDLE_VERSION,
    AttributeChange,
    BundleInvalid,
    PolicyBundle,
    default_bundle,
    schema_cedar_text,
    schema_json,
)
from ledgerflow import admin, readside
from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec, PoisonEvent
from streams.events import PLATFORM_TENANT, PolicyAttributesSet, PolicyPublished
from streams.topics import Topics

#: Envelope tenant of platform-wide policy facts (bundles, non-tenant entities): their own audit chain.
READ_TIMEOUT_S = 30.0


class PolicyCommandError(ValueError):
    """A policy command that was refused; the message says why and what to do instead."""


def _author() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


# --- reading the topic ----------------------------------------------------------------------


def read_bundles(settings: Settings) -> list[PolicyPublished]:
    """Every PolicyPublished record on the topic, in topic order (the last one is active)."""
    topic = Topics(settings.topic_prefix, settings.partitions).name("policy-bundles")
    codec = Codec()
    out: list[PolicyPublished] = []
    for _t, _o, msg in read_to_end(settings.bootstrap, [topic], READ_TIMEOUT_S, strict=True):
        try:
            event = codec.decode(msg.value())
        except PoisonEvent:
            continue
        if isinstance(event, PolicyPublished):
            out.append(event)
    return out


def versions(records: list[PolicyPublished]) -> list[PolicyPublished]:
    """The newest record of each version, ordered by that record's position on the topic."""
    newest: dict[str, PolicyPublished] = {}
    for rec in records:
        newest.pop(rec.version, None)
        newest[rec.version] = rec
    return list(newest.values())


# --- commands as functions (the tests call these) --------------------------------------------


def validate(text: str, version: str) -> PolicyBundle:
    """Parse and validate; raises BundleInvalid with every error. Publishes nothing."""
    return PolicyBundle.parse(text, version)


def publish(
    settings: Settings, text: str, version: str, note: str | None = None, author: str | None = None
) -> PolicyPublished:
    """Validate `text`, then publish it as the active bundle with its audit record.

    Raises BundleInvalid (nothing is produced) or PolicyCommandError when `version` is taken.
    """
    bundle = validate(text, version)
    records = read_bundles(settings)
    current = records[-1] if records else None
    taken = next((r for r in reversed(records) if r.version == version), None)
    if taken is not None:
        if taken.content_sha256 != bundle.content_sha256:
            raise PolicyCommandError(
                f"version {version!r} is already published with other content ({taken.content_sha256[:12]}); "
                "a version never changes (recorded decisions name it): publish under a new --version"
            )
        if current is not None and current.version == version:
            raise PolicyCommandError(f"version {version!r} with this content is already the active bundle")
        raise PolicyCommandError(f"version {version!r} is already published: `ledgerflow policy rollback {version}`")
    return _publish_bundle(settings, bundle, current, note, author or _author(), None)


def rollback(settings: Settings, version: str, note: str | None = None, author: str | None = None) -> PolicyPublished:
    """Make an earlier version active again by re-publishing its text as the newest record.

    The text is re-validated against today's schema first. `default-1` (the shipped default)
    can be rolled back to even if it was never published.
    """
    records = read_bundles(settings)
    current = records[-1] if records else None
    if current is not None and current.version == version:
        raise PolicyCommandError(f"version {version!r} is already the active bundle")
    target = next((r for r in reversed(records) if r.version == version), None)
    if target is not None:
        bundle = PolicyBundle.from_published(target.version, target.bundle, target.content_sha256)
    elif version == DEFAULT_BUNDLE_VERSION:
        bundle = default_bundle()
    else:
        known = ", ".join(r.version for r in versions(records)) or "none"
        raise PolicyCommandError(f"version {version!r} is not on the topic; published versions: {known}")
    return _publish_bundle(settings, bundle, current, note, author or _author(), version)


def _publish_bundle(
    settings: Settings,
    bundle: PolicyBundle,
    current: PolicyPublished | None,
    note: str | None,
    author: str,
    rollback_of: str | None,
) -> PolicyPublished:
    change_note = note if rollback_of is None else f"rollback to {rollback_of}" + (f": {note}" if note else "")
    event = PolicyPublished(
        envelope=admin.envelope("PolicyPublished", PLATFORM_TENANT),
        author=author,
        previous_version=current.version if current is not None else None,
        change_note=change_note,
        **bundle.published_fields(),
    )
    details = {
        "content_sha256": bundle.content_sha256,
        "policy_count": str(bundle.policy_count),
        "previous_version": current.version if current is not None else "",
    }
    if rollback_of is not None:
        details["rollback"] = "true"
    if change_note:
        details["note"] = change_note[:500]
    admin.publish(settings, [event, admin.audit_of(event, "policy.published", author, bundle.version, details)])
    return event


def set_attributes(
    settings: Settings,
    entity_type: str,
    entity_id: str,
    attributes: dict[str, Any] | None,
    *,
    deleted: bool = False,
    tenant: str | None = None,
    author: str | None = None,
) -> PolicyAttributesSet:
    """Set (whole) or delete one entity's attributes, with its audit record; refuses what the schema would.

    The envelope tenant is the entity's own for a Tenant, else `tenant` or the platform's.
    """
    change = AttributeChange(entity_type, entity_id, attributes or {}, deleted)
    attributes_json = change.attributes_json()  # raises AttributesInvalid naming every problem
    by = author or _author()
    owner = entity_id if entity_type == "Tenant" else (tenant or PLATFORM_TENANT)
    event = PolicyAttributesSet(
        envelope=admin.envelope("PolicyAttributesSet", owner),
        entity_type=entity_type,
        entity_id=entity_id,
        attributes_json=attributes_json,
        set_by=by,
        deleted=deleted,
    )
    details = {"entity": event.entity_key, "deleted": str(deleted).lower(), "attributes": attributes_json[:1000]}
    admin.publish(settings, [event, admin.audit_of(event, "policy.attributes_set", by, event.entity_key, details)])
    return event


def model_regions(settings: Settings) -> dict[str, str]:
    """{model: jurisdiction} of the gateway's registry, sent with a dry-run so it seeds models as the gateway does."""
    from gateway.policy import jurisdiction  # the command line may import the sides; loaded only for `diff`
    from gateway.server import build_registry

    return {m.name: jurisdiction(m.region) for m in build_registry(settings).models()}


def dry_run(
    settings: Settings, text: str, version: str = "candidate", last: int = 1000, examples: int = 3
) -> dict[str, Any]:
    """The read side's DiffReport of `text` against the active bundle over the last `last` decisions."""
    validate(text, version)  # refuse locally, with every error, before asking the read side
    body = {"bundle": text, "version": version, "last": last, "examples": examples, "models": model_regions(settings)}
    req = urllib.request.Request(
        f"{settings.projections_url}/v1/policy/dry-run",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **readside.auth_headers(settings)},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
        except ValueError:
            doc = {"error": exc.reason}
        errors = "".join(f"\n  - {e}" for e in doc.get("errors", []))
        raise PolicyCommandError(f"dry-run refused ({exc.code}): {doc.get('error')}{errors}") from None
    except urllib.error.URLError as exc:
        raise PolicyCommandError(
            f"the read side at {settings.projections_url} is not reachable ({exc.reason}): is `ledgerflow up` running?"
        ) from None


# --- the command line ------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("policy", help="publish, list, roll back and diff policy bundles; set attributes")
    ps = p.add_subparsers(dest="policy_command", required=True)
    pub = ps.add_parser("publish", help="validate a Cedar bundle and publish it as the active one")
    pub.add_argument("file", type=Path)
    pub.add_argument("--version", required=True, help="a new version name, e.g. 2026-11-28.1")
    pub.add_argument("--note", help="why this change (recorded with the bundle)")
    ps.add_parser("list", help="published versions; * marks the active one")
    rb = ps.add_parser("rollback", help="make an earlier version active again")
    rb.add_argument("version")
    rb.add_argument("--note")
    df = ps.add_parser("diff", help="what a candidate bundle would decide differently over recent decisions")
    df.add_argument("file", type=Path)
    df.add_argument("--last", type=int, default=1000, metavar="N", help="replay the last N recorded decisions")
    df.add_argument("--examples", type=int, default=3, help="examples kept per kind of flip")
    df.add_argument("--json", action="store_true", help="print the whole report as JSON")
    sc = ps.add_parser("schema", help="the schema bundles are validated against")
    sc.add_argument("--json", action="store_true", help="Cedar's JSON schema form instead of the human one")
    at = ps.add_parser("attributes", help="set or delete one entity's policy attributes")
    ats = at.add_subparsers(dest="attributes_command", required=True)
    st = ats.add_parser("set", help='replace an entity\'s attributes, e.g. set Tenant acme \'{"residency": "eu"}\'')
    st.add_argument("entity_type", choices=["Tenant", "Principal", "Model", "Tool"])
    st.add_argument("entity_id")
    st.add_argument("attributes", help="a JSON object (decimals as strings)")
    st.add_argument("--tenant", help="envelope tenant for a Principal (default: the platform)")
    dl = ats.add_parser("delete", help="delete an entity's attributes")
    dl.add_argument("entity_type", choices=["Tenant", "Principal", "Model", "Tool"])
    dl.add_argument("entity_id")
    dl.add_argument("--tenant")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no bundle file at {path}") from None


def _refused(command: str, exc: BundleInvalid) -> int:
    what = "nothing was published" if command in ("publish", "rollback") else "nothing was evaluated"
    print(f"ledgerflow: refused, {what}: {exc}", file=sys.stderr)
    return 1


def cmd(settings: Settings, args: Any) -> int:
    command = args.policy_command
    try:
        if command == "publish":
            event = publish(settings, _read(args.file), args.version, args.note)
            print(
                f"published {event.version} ({event.content_sha256[:12]}, {event.policy_count} policies), "
                f"replacing {event.previous_version or 'the shipped default'}; replicas switch within a second"
            )
            return 0
        if command == "list":
            return _list(settings)
        if command == "rollback":
            event = rollback(settings, args.version, args.note)
            print(f"rolled back: {event.version} ({event.content_sha256[:12]}) is active again")
            return 0
        if command == "diff":
            report = dry_run(settings, _read(args.file), last=args.last, examples=args.examples)
            print(json.dumps(report, indent=2) if args.json else "\n".join(_report_lines(report)))
            return 0
        if command == "schema":
            print(schema_json() if args.json else schema_cedar_text())
            return 0
        if command == "attributes":
            return _attributes(settings, args)
    except BundleInvalid as exc:
        return _refused(command, exc)
    except PolicyCommandError as exc:
        print(f"ledgerflow: {exc}", file=sys.stderr)
        return 1
    return 2


def _attributes(settings: Settings, args: Any) -> int:
    if args.attributes_command == "set":
        try:
            attrs = json.loads(args.attributes)
        except ValueError as exc:
            raise PolicyCommandError(f'attributes are not JSON ({exc}): e.g. \'{{"residency": "eu"}}\'') from None
        if not isinstance(attrs, dict):
            raise PolicyCommandError("attributes must be a JSON object")
        event = set_attributes(settings, args.entity_type, args.entity_id, attrs, tenant=args.tenant)
        print(f"set {event.entity_key}: {event.attributes_json}")
    else:
        event = set_attributes(settings, args.entity_type, args.entity_id, None, deleted=True, tenant=args.tenant)
        print(f"deleted {event.entity_key}")
    return 0


def _list(settings: Settings) -> int:
    records = read_bundles(settings)
    if not records:
        print(f"no bundle published: the shipped default ({DEFAULT_BUNDLE_VERSION}) is active")
        return 0
    active = records[-1]
    print(f"  {'version':<24} {'sha256':<12} {'policies':>8}  {'published (UTC)':<19}  {'author':<16} note")
    for rec in versions(records):
        mark = "*" if rec is active else ("s" if rec.version == settings.policy_shadow_version else " ")
        at = rec.envelope.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{mark} {rec.version:<24} {rec.content_sha256[:12]:<12} {rec.policy_count:>8}  {at:<19}  "
            f"{rec.author:<16} {rec.change_note or ''}"
        )
    return 0


def _report_lines(report: dict[str, Any]) -> list[str]:
    out = [
        f"{report['active_version']} → {report['candidate_version']}: {report['evaluated']} recorded decisions, "
        f"{report['flipped']} would flip, {report['unchanged']} unchanged ({report['timings_ms']['total']} ms)"
    ]
    for kind, count in report["counts"].items():
        by = ", ".join(f"{p} {n}" for p, n in report["by_policy"][kind].items())
        out.append(f"  {kind:<20} {count:>7}" + (f"  by policy: {by}" if by else ""))
        for ex in report.get("examples", {}).get(kind, []):
            inp = ex["input"]
            out.append(
                f"      e.g. tenant {inp['tenant']} principal {inp['principal']} "
                f"{inp['data_classification']} model {inp['model'] or '(router)'}: "
                f"{ex['active']['decision']} → {ex['candidate']['decision']} "
                f"{'; '.join(ex['candidate']['reasons'])}"
            )
    return out
