"""Memory fabric through the real broker (and a real redis-server for several replicas).

What is proved: a turn is answered only once Kafka holds it; content never reaches the fact
log or the memory topic in clear; a replica restarted (or a Redis flushed or restarted) rebuilds
the window from the log; a write on one replica is read at once on another; erase makes the
content unreadable at once (crypto-shredding) and records MemoryErased; /v1/ask with a session
prepends the window and appends the new turns.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.memory import (
    LocalWindow,
    MemoryFabric,
    MemoryLog,
    RedisWindow,
    Sealer,
    Turn,
    key_record_key,
    turn_record_key,
    window_of,
)
from infra.redis import RedisConfig, start, stop
from ledgerflow.settings import hash_key
from streams.codec import Codec
from streams.events import MemoryErased, MemoryWritten
from streams.publisher import FactPublisher
from streams.topics import Topics
from tests.conftest import free_port
from tests.kafka_helpers import read_all
from tests.redis_fixture import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]

SECRET = {"acme": "lf_mem_acme", "globex": "lf_mem_globex"}
CODEC = Codec()
KEK = os.urandom(32)


def keystore() -> KeyStore:
    return KeyStore((f"key-{t}", t, hash_key(s), ["user"]) for t, s in SECRET.items())


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET[tenant]}"}


# --- pure parts -------------------------------------------------------------------------------


def test_a_sealed_turn_opens_only_under_its_own_record_key() -> None:
    kid, key = Sealer.new_key()
    turn = Turn(3, "user", "the plan is blue", "2026-11-29T00:00:00.000+00:00")
    sealed = Sealer.seal(turn_record_key("acme", "s1", 3), kid, key, turn)
    assert b"blue" not in sealed
    assert Sealer.open(turn_record_key("acme", "s1", 3), key, sealed) == turn
    from cryptography.exceptions import InvalidTag

    for moved in (
        turn_record_key("globex", "s1", 3),
        turn_record_key("acme", "s2", 3),
        turn_record_key("acme", "s1", 4),
    ):
        with pytest.raises(InvalidTag):
            Sealer.open(moved, key, sealed)
    sealer = Sealer(KEK)
    wrapped = sealer.wrap(key_record_key("acme", "s1"), kid, key)
    assert key not in wrapped and sealer.unwrap(key_record_key("acme", "s1"), wrapped) == (kid, key)
    with pytest.raises(InvalidTag):
        Sealer(os.urandom(32)).unwrap(key_record_key("acme", "s1"), wrapped)


def test_the_window_is_the_newest_whole_turns_within_both_bounds() -> None:
    turns = [Turn(i, "user", "x" * (10 * (i + 1)), "t") for i in range(5)]  # 10, 20, 30, 40, 50 chars
    assert [t.index for t in window_of(turns, 3, 10_000)] == [2, 3, 4]
    assert [t.index for t in window_of(turns, 10, 90)] == [3, 4]
    assert [t.index for t in window_of(turns, 10, 49)] == []  # whole turns only
    assert [t.index for t in window_of(list(reversed(turns)), 2, 1000)] == [3, 4]


# --- through Kafka ------------------------------------------------------------------------------


class Replica:
    """One gateway replica's memory parts: its own publisher, fold and window (local or Redis)."""

    def __init__(self, bootstrap: str, topics: Topics, name: str, redis: str | None = None) -> None:
        self.publisher = FactPublisher(bootstrap, f"test-{topics.prefix}{name}", topics)
        self.log = MemoryLog(bootstrap, topics.memory(), Sealer(KEK))
        self.window = (
            RedisWindow.from_url(redis, self.log, prefix=f"lf:mem:{topics.prefix}") if redis else LocalWindow(self.log)
        )
        self.fabric = MemoryFabric(self.log, self.window, self.publisher, max_turns=50, publish_timeout=10)

    async def start(self) -> None:
        self.publisher.start()
        self.log.start()
        assert await asyncio.to_thread(self.log.loaded.wait, 30), "memory log not loaded"

    async def close(self) -> None:
        await self.fabric.aclose()
        await asyncio.to_thread(self.log.close)
        await asyncio.to_thread(self.publisher.close)

    def app(self, **kw: Any) -> TestServer:
        return TestServer(create_app(keystore(), self.publisher, always_ready, memory=self.fabric, **kw))


@pytest.fixture
async def replicas(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[Callable[..., Any]]:
    made: list[Replica] = []

    async def make(name: str, redis: str | None = None) -> Replica:
        r = Replica(kafka_bootstrap, topics, name, redis)
        made.append(r)
        await r.start()
        return r

    yield make
    for r in made:
        await r.close()


@pytest.mark.kafka
async def test_turns_are_logged_sealed_rebuilt_after_restart_and_shredded_on_erase(
    kafka_bootstrap: str, topics: Topics, replicas: Callable[..., Any]
) -> None:
    one = await replicas("one")
    async with TestClient(one.app()) as client:
        for i, text in enumerate(["my secret plan is blue", "noted", "mail me at ann@example.com"]):
            role = "assistant" if i % 2 else "user"
            resp = await client.post("/v1/memory/s-1", json={"role": role, "content": text}, headers=auth("acme"))
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["turn_index"] == i
        got = await (await client.get("/v1/memory/s-1", headers=auth("acme"))).json()
        assert [t["content"] for t in got["turns"]] == [
            "my secret plan is blue",
            "noted",
            "mail me at [REDACTED:email]",
        ]
        assert [t["index"] for t in got["turns"]] == [0, 1, 2]
        last = await (await client.get("/v1/memory/s-1?turns=1", headers=auth("acme"))).json()
        assert [t["index"] for t in last["turns"]] == [2]

    facts = read_all(kafka_bootstrap, [topics.name("memory-facts")], expect=3)
    written = [CODEC.decode(m.value()) for m in facts]
    assert all(isinstance(e, MemoryWritten) and e.tenant == "acme" for e in written)
    assert [e.turn_index for e in written] == [0, 1, 2]  # type: ignore[attr-defined]
    # the facts (kept forever) name the session only by a keyed pseudonym, and digest the content
    # under the session's data key: no plain hash of a short turn to brute-force after an erase
    [pseudonym] = {e.session_id for e in written}  # type: ignore[attr-defined]
    assert pseudonym.startswith("s_") and "s-1" not in pseudonym
    assert written[0].content_sha256 != hashlib.sha256(b"my secret plan is blue").hexdigest()  # type: ignore[attr-defined]
    every_fact = read_all(kafka_bootstrap, topics.all(), expect=3)
    state = read_all(kafka_bootstrap, [topics.memory()], expect=6)
    for m in [*every_fact, *state]:
        assert b"blue" not in (m.value() or b"") and b"ann@example" not in (m.value() or b"")

    # a second replica (a restarted process) rebuilds the same window from the log alone
    two = await replicas("two")
    assert [t.content for t in two.log.turns("acme", "s-1")] == [
        "my secret plan is blue",
        "noted",
        "mail me at [REDACTED:email]",
    ]
    assert two.log.turns("globex", "s-1") == []

    async with TestClient(two.app()) as client:
        resp = await client.delete("/v1/memory/s-1", headers=auth("acme"))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["turns_erased"] == 3
        assert (await (await client.get("/v1/memory/s-1", headers=auth("acme"))).json())["turns"] == []
        again = await client.post("/v1/memory/s-1", json={"role": "user", "content": "fresh"}, headers=auth("acme"))
        assert (await again.json())["turn_index"] == 0  # a new incarnation of the session
    erased = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("memory-facts")], expect=5)]
    [fact] = [e for e in erased if isinstance(e, MemoryErased)]
    assert (fact.session_id, fact.turns_erased, fact.erased_by, fact.tenant) == (pseudonym, 3, "key-acme", "acme")
    assert two.log.sealer.pseudonym("globex", "s-1") != pseudonym  # the same id in another tenant is another session

    # crypto-shredding: the sealed turns are still on the uncompacted topic, but no key opens them
    records = read_all(kafka_bootstrap, [topics.memory()], expect=12)
    sealed_before = [m for m in records if m.key() == turn_record_key("acme", "s-1", 0) and m.value()]
    assert len(sealed_before) == 2  # the erased turn 0 and the new turn 0
    three = await replicas("three")
    assert [t.content for t in three.log.turns("acme", "s-1")] == ["fresh"]
    kid, _ = three.log.key_of("acme", "s-1") or (b"", b"")
    assert Sealer.sealed_kid(sealed_before[0].value() or b"") != kid


@pytest.mark.kafka
async def test_a_committed_turn_the_fold_has_not_seen_yet_is_201_and_the_next_takes_the_next_index(
    replicas: Callable[..., Any], kafka_bootstrap: str, topics: Topics
) -> None:
    """A 503 after the commit would make the client store the turn twice; a reused index would
    overwrite it on the compacted topic. Here the fold is stopped, so every sync times out."""
    one = await replicas("stalled")
    one.window._sync_timeout = 0.2  # type: ignore[union-attr]
    await asyncio.to_thread(one.log.close)  # the fold stops: Kafka commits, the replica never sees it
    async with TestClient(one.app()) as client:
        for n, text in enumerate(["first", "second"]):
            resp = await client.post("/v1/memory/s-9", json={"role": "user", "content": text}, headers=auth("acme"))
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["turn_index"] == n
    records = read_all(kafka_bootstrap, [topics.memory()], expect=4)
    keyed = [m for m in records if m.key() == key_record_key("acme", "s-9")]
    assert len({Sealer(KEK).unwrap(m.key(), m.value() or b"") for m in keyed}) == 1  # one data key, re-sent
    fresh = await replicas("caught-up")
    assert [t.content for t in fresh.log.turns("acme", "s-9")] == ["first", "second"]


@pytest.mark.kafka
async def test_ask_with_a_session_prepends_the_window_and_appends_the_turns(replicas: Callable[..., Any]) -> None:
    one = await replicas("ask")
    async with TestClient(one.app()) as client:
        first = await client.post(
            "/v1/ask", json={"prompt": "hello, I am Ann", "session": "chat-9"}, headers=auth("acme")
        )
        assert first.status == 200, await first.text()
        answer = (await first.json())["answer"]
        window = (await (await client.get("/v1/memory/chat-9", headers=auth("acme"))).json())["turns"]
        assert [(t["role"], t["content"]) for t in window] == [("user", "hello, I am Ann"), ("assistant", answer)]
        rid = (await first.json())["request_id"]
        assert {t["request_id"] for t in window} == {rid}
        streamed = await client.post(
            "/v1/ask", json={"prompt": "what is my name?", "session": "chat-9", "stream": True}, headers=auth("acme")
        )
        assert streamed.status == 200
        await streamed.read()
        window = (await (await client.get("/v1/memory/chat-9", headers=auth("acme"))).json())["turns"]
        assert [t["role"] for t in window] == ["user", "assistant", "user", "assistant"]
        assert window[2]["content"] == "what is my name?"
        # the model saw the window: the simulator's answer depends on every message it got
        alone = await client.post("/v1/ask", json={"prompt": "what is my name?"}, headers=auth("acme"))
        assert (await alone.json())["answer"] != window[3]["content"]
        bad = await client.post("/v1/ask", json={"prompt": "x", "session": "no spaces"}, headers=auth("acme"))
        assert bad.status == 422 and (await bad.json())["error"]["fields"] == ["session"]


@pytest.mark.kafka
@pytest.mark.redis
async def test_replicas_sharing_redis_read_their_writes_and_rebuild_after_a_flush_or_restart(
    redis_server: RedisConfig, replicas: Callable[..., Any]
) -> None:
    a = await replicas("a", redis_server.url)
    b = await replicas("b", redis_server.url)
    async with AsyncExitStack() as stack:
        ca = await stack.enter_async_context(TestClient(a.app()))
        cb = await stack.enter_async_context(TestClient(b.app()))

        async def post(client: TestClient[Any, Any], text: str) -> int:
            resp = await client.post("/v1/memory/shared", json={"role": "user", "content": text}, headers=auth("acme"))
            assert resp.status == 201, await resp.text()
            return int((await resp.json())["turn_index"])

        async def contents(client: TestClient[Any, Any]) -> list[str]:
            got = await (await client.get("/v1/memory/shared", headers=auth("acme"))).json()
            return [t["content"] for t in got["turns"]]

        for i in range(5):  # read-your-writes across replicas, no waiting in between
            await post(ca if i % 2 else cb, f"turn {i}")
            assert await contents(cb if i % 2 else ca) == [f"turn {j}" for j in range(i + 1)]
        # concurrent appends on both replicas never share an index
        indices = await asyncio.gather(*(post(ca if i % 2 else cb, f"c{i}") for i in range(10)))
        assert sorted(indices) == list(range(5, 15))

        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(redis_server.url)
        await r.flushall()
        before = a.window.rebuilds  # type: ignore[attr-defined]
        got = await contents(ca)
        assert len(got) == 15 and got[:5] == [f"turn {j}" for j in range(5)]
        assert a.window.rebuilds == before + 1  # type: ignore[attr-defined]
        assert await post(cb, "after flush") == 15  # the next index survives too
        await r.aclose()

        stop(redis_server)  # a restart loses everything (no persistence)
        start(redis_server)
        assert (await contents(cb))[-1] == "after flush"
        assert len(await contents(ca)) == 16
        # several turns at once (a question and its answer): consecutive indices, one transaction
        from domain.keys import Principal

        who = Principal("acme", "key-acme", ("user",), None)
        many = await b.fabric.append_many(who, "shared", [("user", "q"), ("assistant", "a"), ("user", "q2")])
        assert [s.turn.index for s in many] == [16, 17, 18]
        assert (await contents(ca))[-3:] == ["q", "a", "q2"]

        resp = await cb.delete("/v1/memory/shared", headers=auth("acme"))
        assert (await resp.json())["turns_erased"] == 19
        assert await contents(ca) == []


async def test_an_unreachable_event_log_is_503_with_retry_after_and_nothing_is_stored() -> None:
    dead = f"127.0.0.1:{free_port()}"
    topics = Topics("dead.")
    publisher = FactPublisher(dead, "test-dead-memory", topics)
    log = MemoryLog(dead, topics.memory(), Sealer(KEK))  # never loaded: nothing reaches it
    publisher.start()
    fabric = MemoryFabric(log, LocalWindow(log), publisher, publish_timeout=1.0)
    try:
        async with TestClient(TestServer(create_app(keystore(), publisher, always_ready, memory=fabric))) as client:
            started = time.monotonic()
            resp = await client.post("/v1/memory/s", json={"role": "user", "content": "x"}, headers=auth("acme"))
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert time.monotonic() - started < 3.0
            assert (await resp.json())["error"]["code"] == "event_log_unavailable"
            assert log.turns("acme", "s") == []
    finally:
        publisher.close(timeout=1)
