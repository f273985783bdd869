"""Publishes a request's facts atomically: a group-committing transactional producer.

Why transactions: a request records several facts on several topics (request, decision,
charge, audit). Without a transaction a crash between two sends leaves a request
half-recorded. Here every `publish(events)` call lands all its events or none: they are
produced inside one Kafka transaction, and every consumer reads with
`isolation.level=read_committed`, so an aborted transaction is never seen.

Why group commit: a transaction costs a few round trips to the coordinator. A few threads
("lanes") each own a producer; callers enqueue their events and wait; a free lane takes
everything queued (up to `max_batch`) into one transaction, so throughput grows with
concurrency instead of paying one commit per request, and a batch need not wait for the
previous batch's commit to finish. One lane is the default: on a 2-core machine sharing the
broker, 3 lanes gave no better p99 (see BENCHMARKS.md) and cost the broker more CPU.

Double counting: the producer is idempotent (acks=all), so the broker drops its own retries.
A commit that times out has an unknown outcome; the caller is told it failed (the gateway
answers 503) and a client retry with the same Idempotency-Key produces the same event ids
(see `streams.ids.derived_uuid7`), which downstream folds and tables collapse.

Deadlines: every call carries a deadline (the gateway's 2 s budget); a batch's commit waits
at most until its earliest deadline, and a call whose deadline passed before its batch began
is failed without being produced, so a dead broker turns into a prompt 503, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException

from streams.clients import Producer
from streams.codec import Codec
from streams.events import Event
from streams.topics import Topics

log = logging.getLogger(__name__)


_Record = tuple[str, bytes, bytes | None, list[tuple[str, str | bytes | None]]]  # topic, key, value, headers
Record = _Record  # public name: raw state records (e.g. the memory topic's) published beside facts; None = tombstone


class PublishFailed(RuntimeError):
    """The facts were not (or not known to be) committed; the caller should answer 503."""


@dataclass
class _Pending:
    records: list[_Record]
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    enqueued: float = field(default_factory=time.monotonic)


class FactPublisher:
    """Thread-owned transactional producer with group commit. Start once, share per process."""

    def __init__(
        self,
        bootstrap: str,
        transactional_id: str,
        topics: Topics,
        codec: Codec | None = None,
        *,
        linger: float = 0.002,
        max_batch: int = 1000,
        transaction_timeout_ms: int = 10_000,
        lanes: int = 1,
    ) -> None:
        self._conf = {
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
            "transaction.timeout.ms": transaction_timeout_ms,
            "socket.connection.setup.timeout.ms": 1000,
            "reconnect.backoff.max.ms": 500,
            "message.timeout.ms": transaction_timeout_ms,
            # Back-to-back transactions often meet CONCURRENT_TRANSACTIONS while the previous
            # commit's markers are written; the default 100 ms retry backoff then dominates latency.
            "retry.backoff.ms": 5,
            "retry.backoff.max.ms": 50,
            "logger": log,  # librdkafka's own lines go through logging, not raw to stderr
        }
        self._topics = topics
        self._codec = codec or Codec()
        self._linger = linger
        self._max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._lanes = [_Lane(self, self._conf, n) for n in range(lanes)]
        self._started = False
        self.last_ok: float = 0.0  # monotonic time of the last successful commit
        self.last_error: str | None = None

    def start(self) -> None:
        if not self._started:
            self._started = True
            for lane in self._lanes:
                lane.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        if self._started:
            self._queue.put(None)
            for lane in self._lanes:
                lane.thread.join(timeout)
        for lane in self._lanes:
            lane.flush(timeout)

    def encode(self, events: Sequence[Event]) -> list[_Record]:
        """Encode outside the producer thread: (topic, key, value, headers) per event."""
        out: list[_Record] = []
        for e in events:
            headers: list[tuple[str, str | bytes | None]] = [("lf.event_type", e.event_type.encode())]
            if e.envelope.trace_parent:
                headers.append(("traceparent", e.envelope.trace_parent.encode()))
            out.append((self._topics.for_event(e.event_type), self._topics.key_for(e), self._codec.encode(e), headers))
        return out

    async def publish(self, events: Sequence[Event], timeout: float = 1.8, records: Sequence[_Record] = ()) -> None:
        """Return once `events` and raw state `records` are all committed together; raise PublishFailed otherwise."""
        if not self._started:
            raise PublishFailed("publisher not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Pending([*self.encode(events), *records], time.monotonic() + timeout, loop, fut))
        await fut

    @property
    def ready(self) -> bool:
        """True once a transactional producer is initialised (the first init can take seconds)."""
        return any(lane.ready for lane in self._lanes)


class _Lane:
    """One transactional producer and the thread that owns it.

    Several lanes take batches from the same queue, so one batch can be produced while the
    previous one is still committing: a commit's round trips no longer queue every request
    behind them. Each lane has its own transactional.id (`<id>-<n>`); a batch is still one
    transaction, so a request's facts still land together.
    """

    def __init__(self, pub: FactPublisher, conf: dict[str, object], n: int) -> None:
        self._pub = pub
        self._conf = {**conf, "transactional.id": f"{conf['transactional.id']}-{n}"}
        self._producer: Producer | None = None  # initialised and owned by the thread
        self._initing: Producer | None = None  # being initialised (init_transactions can be retried)
        self.thread = threading.Thread(target=self._run, name=f"fact-publisher-{n}", daemon=True)

    @property
    def ready(self) -> bool:
        return self._producer is not None

    def flush(self, timeout: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)

    def _run(self) -> None:
        while True:
            if self._producer is None:
                # Not initialised: warm up in short slices between polls, so a call queued
                # meanwhile still gets its answer within its deadline.
                try:
                    first = self._pub._queue.get(timeout=0.05)
                except queue.Empty:
                    self._try_init(1.0)
                    continue
            else:
                first = self._pub._queue.get()
            if first is None:
                self._pub._queue.put(None)  # let the other lanes see it too
                return
            batch = [first]
            stop = time.monotonic() + self._pub._linger
            while len(batch) < self._pub._max_batch:
                try:
                    item = self._pub._queue.get(timeout=max(0.0, stop - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._pub._queue.put(None)
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live = [p for p in batch if p.deadline > now]
        for p in batch:
            if p.deadline <= now:
                _resolve(p, PublishFailed("timed out waiting for the event log"))
        if not live:
            return
        deadline = min(p.deadline for p in live)
        try:
            producer = self._ensure_producer(deadline)
            producer.begin_transaction()
            for p in live:
                for topic, key, value, headers in p.records:
                    producer.produce(topic, value=value, key=key, headers=headers)
            producer.commit_transaction(max(0.05, deadline - time.monotonic()))
        except (KafkaException, BufferError, PublishFailed) as exc:
            self._pub.last_error = _describe(exc)
            log.warning("publish failed, %d calls get 503: %s", len(live), self._pub.last_error)
            self._discard_producer()
            for p in live:
                _resolve(p, PublishFailed(self._pub.last_error))
            return
        self._pub.last_ok = time.monotonic()
        self._pub.last_error = None
        for p in live:
            _resolve(p, None)

    def _try_init(self, timeout: float) -> None:
        """One bounded attempt to initialise the transactional producer; retried by callers."""
        if self._initing is None:
            self._initing = Producer(self._conf)
        try:
            # A new producer with the same transactional.id fences any earlier one and makes
            # the coordinator abort its open transaction: no half-commit survives a restart.
            self._initing.init_transactions(timeout)
        except KafkaException as exc:
            self._pub.last_error = f"event log unreachable: {_describe(exc)}"
            if not exc.args[0].retriable():
                self._initing = None  # start over with a fresh producer next time
            return
        self._producer, self._initing = self._initing, None

    def _ensure_producer(self, deadline: float) -> Producer:
        if self._producer is None:
            self._try_init(max(0.05, deadline - time.monotonic()))
        if self._producer is None:
            raise PublishFailed(self._pub.last_error or "event log unreachable")
        return self._producer

    def _discard_producer(self) -> None:
        # After a failed or unknown commit the producer's transaction state is not reusable;
        # drop it (purging its queue so nothing of the failed batch is sent later).
        if self._producer is not None:
            try:
                self._producer.purge()
                self._producer.abort_transaction(0.2)
            except (KafkaException, RuntimeError):
                pass
            self._producer = None


def _resolve(p: _Pending, error: Exception | None) -> None:
    def settle() -> None:
        if p.future.done():
            return
        if error is None:
            p.future.set_result(None)
        else:
            p.future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody is waiting
        p.loop.call_soon_threadsafe(settle)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err = exc.args[0]
        return f"{err.name()}: {err.str()}"
    return str(exc)
