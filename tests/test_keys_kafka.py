"""API keys issued and revoked as events: every gateway replica learns them from the topic."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.server import build
from ledgerflow import keys
from ledgerflow.settings import Settings, load
from streams.codec import Codec
from streams.events import AuditRecorded
from streams.topics import Topics
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.kafka


def settings_for(bootstrap: str, topics: Topics, replica: int, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LEDGERFLOW_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("LEDGERFLOW_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("LEDGERFLOW_PARTITIONS", str(topics.partitions))
    monkeypatch.setenv("LEDGERFLOW_GATEWAY_INSTANCE_ID", f"{topics.prefix}gw{replica}")
    return load()


CODEC = Codec()


async def status_of(client: TestClient, key: str) -> int:
    resp = await client.post("/v1/ask", json={"prompt": "hello"}, headers={"Authorization": f"Bearer {key}"})
    return resp.status


async def eventually(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_issue_and_revoke_reach_every_replica(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicas = [settings_for(kafka_bootstrap, topics, i, monkeypatch) for i in range(2)]
    async with AsyncExitStack() as stack:
        clients = []
        for s in replicas:
            app, _ = build(s)
            clients.append(await stack.enter_async_context(TestClient(TestServer(app))))
        for c in clients:
            await eventually(lambda c=c: _ready(c))

        key_id, secret = await asyncio.to_thread(keys.issue, replicas[0], "umbrella", ["user"], "ci key")
        assert secret.startswith("lf_umbrella_") and key_id.startswith("key-")
        for c in clients:
            await eventually(lambda c=c: _is(c, secret, 200))
        listed = await asyncio.to_thread(keys.list_keys, replicas[0])
        assert [(k.key_id, k.tenant) for k in listed] == [(key_id, "umbrella")]
        assert secret not in repr(listed)  # only the hash was recorded

        assert await asyncio.to_thread(keys.revoke, replicas[0], key_id, "compromised")
        for c in clients:
            await eventually(lambda c=c: _is(c, secret, 401))
        assert await asyncio.to_thread(keys.list_keys, replicas[0]) == []
        assert not await asyncio.to_thread(keys.revoke, replicas[0], "key-nope", "x")

    # both changes were recorded for the audit ledger, in the same transactions as the changes
    audits = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("audit")], 2)]
    key_audits = [a for a in audits if isinstance(a, AuditRecorded) and a.action.startswith("key.")]
    assert sorted((a.action, a.subject, a.tenant) for a in key_audits) == [
        ("key.issued", key_id, "umbrella"),
        ("key.revoked", key_id, "umbrella"),
    ]
    assert all(secret not in repr(a) for a in audits)


async def _ready(client: TestClient) -> bool:
    return (await client.get("/readyz")).status == 200


async def _is(client: TestClient, secret: str, status: int) -> bool:
    return await status_of(client, secret) == status
