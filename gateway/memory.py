"""Memory fabric: a session's turns, kept recoverable on Kafka and erasable at once (crypto-shredding).

Where things live, and why:

* **Facts** (`MemoryWritten`, `MemoryErased` on the `memory-facts` topic) are immutable and kept
  forever, so they carry only sizes, a keyed digest and a pseudonym: content never enters the
  fact log. The digest is an HMAC under the session's data key (it checks the store against the
  log while the key exists, and confirms nothing once an erase has shredded the key: a plain
  hash of a short turn could be brute-forced forever). The session id a client chose may itself
  be personal data ("alice@example.com"), so the facts carry `Sealer.pseudonym` of it, a keyed
  hash under a key derived from the KEK: stable across replicas, not reversible from the log.
* **Content** lives on the compacted `memory` state topic (`Topics.memory()`, one partition):
  one record per turn, keyed `[tenant, session, index]`, sealed with AES-GCM under a per-session
  data key, the record key as associated data (a record copied to another session or index does
  not open). The data key is a record of the same topic keyed `[tenant, session, "key"]`, wrapped
  by the gateway's key-encryption key (KEK), so the broker's disks alone reveal nothing.
* **Erase** publishes, in one transaction with `MemoryErased`, tombstones for the key and every
  turn. Every replica drops the key when it folds the tombstone, so the sealed turns are
  unreadable from then on, before the cleaner removes them from disk (crypto-shredding); the
  one small key record is what has to be compacted away, not the bulky content.
* **Every replica folds the topic** (`MemoryLog`, like the api-keys follower) and can rebuild any
  session from it. `MemoryLog.sync()` is the read-your-writes barrier: it waits until the fold
  has consumed up to the topic's last stable offset, i.e. every committed write.
* **The hot window**: with one replica the fold itself serves reads (`LocalWindow`; each write
  waits for `sync()` before answering, so the fold holds it). With several replicas a shared
  Redis serves them (`RedisWindow`): a session's turns in a sorted set (score = index) and its
  next index and wrapped data key in a hash, all changed by Lua scripts so two replicas never get
  the same index or two different keys. A session absent from Redis (new, expired, or Redis
  flushed or restarted) is rebuilt there from the fold after `sync()`. Redis holds the turns in
  clear (after redaction): it is an in-memory cache without persistence (`infra.redis`).

Every write answers only after Kafka committed its records and its fact together (the same
transactional publisher as requests). Known limit: an append racing an erase of the same
session can survive the erase (its records may commit after the tombstones); erase again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaException, TopicPartition
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.models import SESSION_PATTERN
from streams.clients import Consumer
from streams.events import Envelope, Event, MemoryErased, MemoryWritten
from streams.ids import uuid7
from streams.publisher import PublishFailed, Record

log = logging.getLogger(__name__)

SESSION_ID = re.compile(SESSION_PATTERN)
PRODUCER = "gateway"
_VERSION = b"\x01"
_NONCE = 12
_KID = 16
POLL_S = 0.02  # the barrier waits for the fold; a short poll keeps a write's wait in milliseconds


@dataclass(frozen=True)
class Turn:
    """One stored turn of a session."""

    index: int
    role: str
    content: str
    at: str  # ISO-8601 UTC
    request_id: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps([self.index, self.role, self.content, self.at, self.request_id])

    @classmethod
    def from_json(cls, raw: bytes | str) -> Turn:
        index, role, content, at, request_id = orjson.loads(raw)
        return cls(int(index), str(role), str(content), str(at), request_id)


def window_of(turns: Sequence[Turn], max_turns: int, max_chars: int) -> list[Turn]:
    """The newest whole turns, oldest first: at most `max_turns` of them and `max_chars` characters."""
    out: list[Turn] = []
    chars = 0
    for turn in sorted(turns, key=lambda t: t.index, reverse=True)[:max_turns]:
        chars += len(turn.content)
        if chars > max_chars:
            break
        out.append(turn)
    out.reverse()
    return out


# --- sealing ---------------------------------------------------------------------------------


def key_record_key(tenant: str, session: str) -> bytes:
    return orjson.dumps([tenant, session, "key"])


def turn_record_key(tenant: str, session: str, index: int) -> bytes:
    return orjson.dumps([tenant, session, index])


def parse_record_key(raw: bytes) -> tuple[str, str, int | None]:
    """(tenant, session, turn index or None for the key record)."""
    tenant, session, which = orjson.loads(raw)
    return str(tenant), str(session), None if which == "key" else int(which)


class Sealer:
    """AES-GCM sealing of turns under per-session data keys, and wrapping of those keys by the KEK."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError("the memory key-encryption key must be 32 bytes")
        self._kek = AESGCM(kek)
        self._pseudonym_key = hmac.new(kek, b"ledgerflow memory session pseudonym v1", hashlib.sha256).digest()

    def pseudonym(self, tenant: str, session: str) -> str:
        """What the facts record instead of the client's session id (which may name a person)."""
        return "s_" + hmac.new(self._pseudonym_key, orjson.dumps([tenant, session]), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def digest(key: bytes, content: str) -> str:
        """Keyed digest of a turn's content under its session's data key: meaningless once shredded."""
        return hmac.new(key, content.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def new_key() -> tuple[bytes, bytes]:
        """(key id, 256-bit data key) for a new session."""
        return uuid.uuid4().bytes, AESGCM.generate_key(bit_length=256)

    def wrap(self, record_key: bytes, kid: bytes, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + kid + nonce + self._kek.encrypt(nonce, key, record_key)

    def unwrap(self, record_key: bytes, value: bytes) -> tuple[bytes, bytes]:
        if value[:1] != _VERSION:
            raise ValueError("unknown memory key record version")
        kid, nonce, body = value[1 : 1 + _KID], value[1 + _KID : 1 + _KID + _NONCE], value[1 + _KID + _NONCE :]
        return kid, self._kek.decrypt(nonce, body, record_key)

    @staticmethod
    def seal(record_key: bytes, kid: bytes, key: bytes, turn: Turn) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + kid + nonce + AESGCM(key).encrypt(nonce, turn.to_json(), record_key)

    @staticmethod
    def sealed_kid(value: bytes) -> bytes:
        return value[1 : 1 + _KID]

    @staticmethod
    def open(record_key: bytes, key: bytes, value: bytes) -> Turn:
        nonce, body = value[1 + _KID : 1 + _KID + _NONCE], value[1 + _KID + _NONCE :]
        return Turn.from_json(AESGCM(key).decrypt(nonce, body, record_key))


# --- the fold of the memory topic -------------------------------------------------------------


class MemoryLog:
    """Every replica's fold of the memory topic: session → data key and sealed turns.

    Followed from offset 0 on a thread (never commits), so a restart rebuilds it from the log.
    `apply` is the whole fold and is pure over its two dicts: the same records give the same state.
    """

    def __init__(self, bootstrap: str, topic: str, sealer: Sealer, *, poll_s: float = POLL_S) -> None:
        self._conf = {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-memory-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
        self.topic = topic
        self.sealer = sealer
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._turns: dict[tuple[str, str], dict[int, bytes]] = {}
        self.position = 0  # next offset the fold will consume (control records included)
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-memory", daemon=True)
        self._probe: Consumer | None = None
        self._probe_lock = threading.Lock()

    # the fold
    def apply(self, key: bytes, value: bytes | None) -> None:
        tenant, session, index = parse_record_key(key)
        sid = (tenant, session)
        with self._lock:
            if index is None:
                if value is None:
                    self._keys.pop(sid, None)  # crypto-shredding: the sealed turns cannot be opened any more
                else:
                    self._keys[sid] = self.sealer.unwrap(key, value)
            elif value is None:
                turns = self._turns.get(sid)
                if turns is not None:
                    turns.pop(index, None)
                    if not turns:
                        del self._turns[sid]
            else:
                self._turns.setdefault(sid, {})[index] = value

    def key_of(self, tenant: str, session: str) -> tuple[bytes, bytes] | None:
        with self._lock:
            return self._keys.get((tenant, session))

    def indices(self, tenant: str, session: str) -> list[int]:
        with self._lock:
            return sorted(self._turns.get((tenant, session), {}))

    def turns(self, tenant: str, session: str) -> list[Turn]:
        """The session's readable turns, oldest first (none once its key is erased)."""
        with self._lock:
            key = self._keys.get((tenant, session))
            sealed = dict(self._turns.get((tenant, session), {}))
        if key is None:
            return []
        kid, data_key = key
        out = []
        for index in sorted(sealed):
            value = sealed[index]
            if Sealer.sealed_kid(value) != kid:
                continue  # sealed under an erased incarnation of the session
            try:
                out.append(Sealer.open(turn_record_key(tenant, session, index), data_key, value))
            except InvalidTag:
                log.warning("memory: a turn of a session does not open with its key; skipped")
        return out

    def sessions(self) -> int:
        with self._lock:
            return len(self._keys)

    # following
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def _run(self) -> None:
        while not self._stop.is_set():
            consumer = Consumer(self._conf)
            try:
                # a reconnect resumes where the fold stopped: re-reading from 0 would briefly
                # bring back turns and keys that later tombstones erased
                tp = TopicPartition(self.topic, 0, self.position)
                _, end = consumer.get_watermark_offsets(tp, timeout=10)
                consumer.assign([tp])
                while not self._stop.is_set():
                    for msg in consumer.consume(500, self._poll_s):
                        key = msg.key()
                        if msg.error() is None and key is not None:
                            try:
                                self.apply(key, msg.value())
                            except (ValueError, InvalidTag, TypeError):
                                log.warning("memory: skipping a record that does not decode or unwrap")
                    [pos] = consumer.position([TopicPartition(self.topic, 0)])
                    if pos.offset > self.position:
                        self.position = pos.offset
                    if not self.loaded.is_set() and self.position >= end:
                        self.loaded.set()
                        log.info("memory loaded: %d sessions", self.sessions())
            except KafkaException as exc:
                log.warning("memory follower restarting after: %s", exc)
                self._stop.wait(0.5)
            finally:
                consumer.close()

    def _log_end(self) -> int:
        """The partition's high watermark: every record of a commit that returned lies below it.

        Not the last stable offset: a commit returns before its markers are written, so right
        after it the LSO can still stand before its records. The fold (read_committed) passes
        them once the markers land, a few milliseconds later.
        """
        with self._probe_lock:
            if self._probe is None:
                self._probe = Consumer(
                    {**self._conf, "group.id": f"ledgerflow-memory-probe-{uuid.uuid4()}",
                     "isolation.level": "read_uncommitted"}
                )  # fmt: skip
            _, high = self._probe.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=2, cached=False)
            return int(high)

    async def sync(self, timeout: float = 2.0) -> None:
        """Wait until the fold holds every write Kafka committed before this call (read-your-writes)."""
        deadline = time.monotonic() + timeout
        try:
            end = await asyncio.to_thread(self._log_end)
        except KafkaException as exc:
            raise PublishFailed(f"memory log unreachable: {exc}") from None
        while self.position < end:
            if time.monotonic() > deadline:
                raise PublishFailed("the memory log did not catch up in time")
            await asyncio.sleep(0.002)


# --- hot windows ---------------------------------------------------------------------------------


class HotWindow(Protocol):
    """Where a replica reads a session's window from, and allocates turn indices."""

    async def allocate(self, tenant: str, session: str, count: int = 1) -> tuple[int, tuple[bytes, bytes]]:
        """The first of `count` consecutive new turn indices and the session's (key id, data key), made if new."""
        ...

    async def stored(self, tenant: str, session: str, turn: Turn) -> None:
        """The turn was committed to the log: make it readable."""
        ...

    async def turns(self, tenant: str, session: str, last: int) -> list[Turn]: ...

    async def erasing(self, tenant: str, session: str) -> None:
        """Called before an erase is published; raising PublishFailed refuses it."""
        ...

    async def erased(self, tenant: str, session: str) -> None: ...

    async def aclose(self) -> None: ...


class LocalWindow:
    """One replica: the fold is the window; a write is readable once `sync()` saw it.

    Indices come from the fold under a per-session lock, which is exact with one writer. A write
    Kafka committed but the fold has not yet seen (its `sync()` timed out) still answers 201, not
    503: it is stored, and a client retrying a 503 would store it twice. Until the fold catches up,
    `_issued` remembers the session's next index and data key, so the next write neither reuses
    the index (which would overwrite the turn on the compacted topic) nor mints a second key.
    """

    def __init__(self, log_: MemoryLog, sync_timeout: float = 2.0) -> None:
        self.log = log_
        self._sync_timeout = sync_timeout
        self._issued: dict[tuple[str, str], tuple[int, tuple[bytes, bytes]]] = {}

    async def allocate(self, tenant: str, session: str, count: int = 1) -> tuple[int, tuple[bytes, bytes]]:
        indices = self.log.indices(tenant, session)
        key = self.log.key_of(tenant, session)
        if key is None:
            key = Sealer.new_key()
            indices = []  # turns of an erased incarnation do not count
        first = indices[-1] + 1 if indices else 0
        issued = self._issued.get((tenant, session))
        if issued is not None:  # an earlier write is committed but not folded yet
            first, key = max(first, issued[0]), issued[1]
        self._issued[(tenant, session)] = (first + count, key)
        return first, key

    async def stored(self, tenant: str, session: str, turn: Turn) -> None:
        try:
            await self.log.sync(self._sync_timeout)
        except PublishFailed as exc:  # committed: answer it; the fold shows it shortly
            log.warning("memory: a committed turn is not in the fold yet: %s", exc)
            return
        self._issued.pop((tenant, session), None)

    async def turns(self, tenant: str, session: str, last: int) -> list[Turn]:
        return self.log.turns(tenant, session)[-last:]

    async def erasing(self, tenant: str, session: str) -> None:
        return None

    async def erased(self, tenant: str, session: str) -> None:
        self._issued.pop((tenant, session), None)
        try:
            await self.log.sync(self._sync_timeout)
        except PublishFailed as exc:  # the tombstones are committed: the erase happened
            log.warning("memory: a committed erase is not in the fold yet: %s", exc)

    async def aclose(self) -> None:
        return None


# KEYS[1] = meta hash (next, key), KEYS[2] = turns zset. All scripts refresh the TTL.
_ALLOC_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'key', ARGV[2])
local i = redis.call('HINCRBY', KEYS[1], 'next', ARGV[3]) - tonumber(ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
return {i, redis.call('HGET', KEYS[1], 'key')}
"""
_POPULATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'key', ARGV[3]) end
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""
_STORE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""
_READ_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
return redis.call('ZRANGE', KEYS[2], -tonumber(ARGV[2]), -1)
"""


class RedisWindow:
    """Several replicas: the window in a shared Redis, rebuilt there from the fold when absent."""

    def __init__(
        self, client: Any, log_: MemoryLog, *, prefix: str = "lf:mem:", ttl_s: int = 86_400, sync_timeout: float = 2.0
    ) -> None:
        self._client = client
        self.log = log_
        self._prefix = prefix
        self._ttl = ttl_s
        self._sync_timeout = sync_timeout
        self._alloc = client.register_script(_ALLOC_LUA)
        self._populate = client.register_script(_POPULATE_LUA)
        self._store = client.register_script(_STORE_LUA)
        self._read = client.register_script(_READ_LUA)
        self.rebuilds = 0  # sessions rebuilt from the log (diagnostics, tests)

    @classmethod
    def from_url(cls, url: str, log_: MemoryLog, **kwargs: Any) -> RedisWindow:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = aioredis.Redis.from_url(
            url,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 1),  # one immediate reconnect (a pooled socket of a restarted server)
            max_connections=64,
        )
        return cls(client, log_, **kwargs)

    def keys(self, tenant: str, session: str) -> list[str]:
        tag = hashlib.sha256(orjson.dumps([tenant, session])).hexdigest()[:32]  # tenant-scoped, no separator games
        return [f"{self._prefix}{{{tag}}}:meta", f"{self._prefix}{{{tag}}}:turns"]

    async def _rebuild(self, tenant: str, session: str) -> None:
        """Put the session back into Redis from the fold, once the fold holds every committed write."""
        await self.log.sync(self._sync_timeout)
        key = self.log.key_of(tenant, session)
        turns = self.log.turns(tenant, session)
        indices = self.log.indices(tenant, session) if key is not None else []
        wrapped = self.log.sealer.wrap(key_record_key(tenant, session), *key) if key is not None else b""
        args: list[Any] = [self._ttl, (indices[-1] + 1) if indices else 0, wrapped]
        for t in turns:
            args += [t.index, t.to_json()]
        self.rebuilds += await self._populate(keys=self.keys(tenant, session), args=args)

    async def allocate(self, tenant: str, session: str, count: int = 1) -> tuple[int, tuple[bytes, bytes]]:
        """Writes need Redis (it hands out the indices): without it they fail (503), never race."""
        rk = key_record_key(tenant, session)
        candidate = self.log.sealer.wrap(rk, *Sealer.new_key())
        try:
            for _ in range(3):
                got = await self._alloc(keys=self.keys(tenant, session), args=[self._ttl, candidate, count])
                if got:
                    index, wrapped = got
                    return int(index), self.log.sealer.unwrap(rk, bytes(wrapped))
                await self._rebuild(tenant, session)
        except RedisError as exc:
            raise PublishFailed(f"memory window (Redis) unavailable: {exc}") from None
        raise PublishFailed("the memory window could not be rebuilt in Redis")

    async def stored(self, tenant: str, session: str, turn: Turn) -> None:
        try:
            await self._store(keys=self.keys(tenant, session), args=[self._ttl, turn.index, turn.to_json()])
        except RedisError as exc:  # committed to the log; the window gets it when Redis rebuilds the session
            log.warning("memory: a committed turn could not be put into Redis: %s", exc)

    async def turns(self, tenant: str, session: str, last: int) -> list[Turn]:
        """From Redis; from the fold (after the barrier) when Redis is unreachable: the log is the truth."""
        try:
            for _ in range(3):
                got = await self._read(keys=self.keys(tenant, session), args=[self._ttl, last])
                if got is not None and got is not False:
                    return [Turn.from_json(bytes(raw)) for raw in got]
                await self._rebuild(tenant, session)
        except RedisError as exc:
            log.warning("memory: Redis unavailable, reading the window from the log: %s", exc)
            await self.log.sync(self._sync_timeout)
            return self.log.turns(tenant, session)[-last:]
        raise PublishFailed("the memory window could not be rebuilt in Redis")

    async def erasing(self, tenant: str, session: str) -> None:
        """Before the tombstones: drop the window, or refuse the erase (nothing done yet)."""
        try:
            await self._client.delete(*self.keys(tenant, session))
        except RedisError as exc:
            raise PublishFailed(f"memory window (Redis) unavailable: {exc}") from None

    async def erased(self, tenant: str, session: str) -> None:
        """After the tombstones: drop what a concurrent rebuild may have put back meanwhile."""
        try:
            await self._client.delete(*self.keys(tenant, session))
        except RedisError as exc:
            log.warning("memory: an erased session's window could not be dropped from Redis: %s", exc)

    async def aclose(self) -> None:
        await self._client.aclose()


# --- the fabric ------------------------------------------------------------------------------------


class Publisher(Protocol):
    async def publish(self, events: Sequence[Event], timeout: float = ..., records: Sequence[Record] = ()) -> None: ...


@dataclass(frozen=True)
class Stored:
    turn: Turn
    fact: MemoryWritten


class MemoryFabric:
    """Append, read and erase session memory; every change is committed to Kafka before it returns."""

    def __init__(
        self,
        log_: MemoryLog,
        window: HotWindow,
        publisher: Publisher,
        *,
        max_turns: int = 20,
        max_chars: int = 16_000,
        publish_timeout: float = 1.8,
    ) -> None:
        self.log = log_
        self.window = window
        self.publisher = publisher
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.publish_timeout = publish_timeout
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, tenant: str, session: str) -> asyncio.Lock:
        lock = self._locks.get((tenant, session))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(tenant, session)] = lock
        return lock

    def _envelope(self, principal: Principal, event_type: str, correlation: str | None, trace: str | None) -> Envelope:
        """A new fact's envelope; correlated with its request when there is one, else with itself."""
        event_id = str(uuid7())
        return Envelope(
            event_id=event_id,
            event_type=event_type,
            schema_version=1,
            tenant=principal.tenant,
            occurred_at=datetime.now(UTC),
            correlation_id=correlation or event_id,
            trace_parent=trace,
            producer=PRODUCER,
        )

    async def append(
        self,
        principal: Principal,
        session: str,
        role: str,
        content: str,
        *,
        request_id: str | None = None,
        trace_parent: str | None = None,
    ) -> Stored:
        """Store one turn (content already redacted as the tenant asks); returns once Kafka committed it."""
        [stored] = await self.append_many(
            principal, session, [(role, content)], request_id=request_id, trace_parent=trace_parent
        )
        return stored

    async def append_many(
        self,
        principal: Principal,
        session: str,
        turns: Sequence[tuple[str, str]],
        *,
        request_id: str | None = None,
        trace_parent: str | None = None,
    ) -> list[Stored]:
        """Store consecutive (role, content) turns in one transaction: all of them or none (e.g. a
        question and its answer); returns once Kafka committed them."""
        tenant = principal.tenant
        async with self._lock(tenant, session):
            first, (kid, key) = await self.window.allocate(tenant, session, len(turns))
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            kk = key_record_key(tenant, session)
            topic = self.log.topic
            records: list[Record] = [(topic, kk, self.log.sealer.wrap(kk, kid, key), [])]  # re-sent: idempotent
            out: list[Stored] = []
            for index, (role, content) in enumerate(turns, first):
                turn = Turn(index, role, content, at, request_id)
                rk = turn_record_key(tenant, session, index)
                records.append((topic, rk, Sealer.seal(rk, kid, key, turn), []))
                fact = MemoryWritten(
                    envelope=self._envelope(principal, "MemoryWritten", request_id, trace_parent),
                    session_id=self.log.sealer.pseudonym(tenant, session),
                    turn_index=index,
                    role=role,
                    content_sha256=Sealer.digest(key, content),
                    chars=len(content),
                    request_id=request_id,
                )
                out.append(Stored(turn, fact))
            await self.publisher.publish([s.fact for s in out], timeout=self.publish_timeout, records=records)
            for stored in out:
                await self.window.stored(tenant, session, stored.turn)
            return out

    async def read(
        self, tenant: str, session: str, max_turns: int | None = None, max_chars: int | None = None
    ) -> list[Turn]:
        """The session's window: the newest whole turns within the turn and character bounds."""
        turns = min(max_turns or self.max_turns, self.max_turns)
        chars = min(max_chars or self.max_chars, self.max_chars)
        return window_of(await self.window.turns(tenant, session, turns), turns, chars)

    async def erase(
        self, principal: Principal, session: str, reason: str = "user_request", trace_parent: str | None = None
    ) -> MemoryErased:
        """Tombstone the session's key and turns and record MemoryErased, in one transaction."""
        tenant = principal.tenant
        async with self._lock(tenant, session):
            await self.window.erasing(tenant, session)
            await self.log.sync()
            indices = self.log.indices(tenant, session)
            readable = len(self.log.turns(tenant, session))
            topic = self.log.topic
            records: list[Record] = [(topic, key_record_key(tenant, session), None, [])]
            records += [(topic, turn_record_key(tenant, session, i), None, []) for i in indices]
            fact = MemoryErased(
                envelope=self._envelope(principal, "MemoryErased", None, trace_parent),
                session_id=self.log.sealer.pseudonym(tenant, session),
                reason=reason,
                turns_erased=readable,
                erased_by=principal.key_id,
            )
            await self.publisher.publish([fact], timeout=self.publish_timeout, records=records)
            await self.window.erased(tenant, session)
            return fact

    async def aclose(self) -> None:
        await self.window.aclose()
