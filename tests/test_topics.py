from __future__ import annotations

from streams.topics import CATALOGUE, Topics
from tests import factories


def test_compacted_topics_are_keyed_by_entity_so_compaction_keeps_every_entity() -> None:
    """Keyed by tenant, compaction would keep only a tenant's newest API key or attribute set."""
    topics = Topics("t.")
    issued = factories.key_issued()
    assert topics.key_for(issued) == issued.key_id.encode()
    attrs = factories.policy_attributes()
    assert topics.key_for(attrs) == b"Tenant::acme"
    bundle = factories.policy_published()
    assert topics.key_for(bundle) == b"p2"
    charge = factories.charge(tenant="globex")
    assert topics.key_for(charge) == b"globex"


def test_every_compacted_topic_names_a_key_its_events_have() -> None:
    for spec in CATALOGUE:
        for name in spec.events:
            event = factories.BUILDERS[name]()
            assert getattr(event, spec.keyed_by), (spec.key, name, spec.keyed_by)
        if spec.compacted:
            assert spec.keyed_by != "tenant", spec.key
