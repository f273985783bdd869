"""Agent: the differential-privacy budget ledger. Decides every DP query request, in log order.

A Kafka transactional consume-transform-produce loop (like agents/ledger.py) around the pure
`domain.dp.fold` (run: `python -m agents.dp_budget`, started by `ledgerflow up`).

Why one decider per budget: concurrent queries must not overspend. The read side never
decides; it records a `DpQueryRequested` on `dp-budget-log`, keyed tenant/metric_set, beside
that budget's `DpBudgetGranted`s. One partition has one owner in this consumer group, so the
requests of one budget are decided one at a time, in log order, by one fold. What each step
guarantees:
1. read a batch of the budget log (read_committed: a request whose transaction aborted is
   never decided);
2. fold each record into its budget (held in memory): a grant adds budget; a request gets a
   `DpQueryCharged` (its loss fits what remains, pending releases included) or a
   `DpQueryRefused` (with what remains, or naming the earlier query for a repeat), written to
   the same partition number of `dp-decisions`. No noise exists yet: the read side draws it
   only after it has read the charge;
3. add the consumed offsets to the transaction and commit: decisions and offsets become
   visible together or not at all, so each request is decided exactly once;
4. on any failure the transaction is aborted, the budgets are restored and the consumer
   rewinds to the committed offsets (the same records are decided again, identically: the
   fold is deterministic and the output ids derive from the request's).

State comes back from the log: when a partition is assigned, its budgets are rebuilt by
folding the budget log from its start up to the group's committed offset, which is exactly
the prefix whose decisions are committed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from datetime import UTC, datetime

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from agents.metrics import AgentMetrics
from domain.dp import Budget, GrantRejected, fold
from streams import telemetry
from streams.admin import read_to_end
from streams.clients import Consumer, Producer
from streams.codec import Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.events import DpBudgetGranted, DpQueryRequested, Event
from streams.metrics import serve
from streams.topics import Topics

AGENT_NAME = "dp-budget"
log = logging.getLogger(__name__)


class DpBudgetWorker:
    """One member of the DP budget agent's consumer group."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Topics,
        codec: Codec | None = None,
        *,
        batch_max: int = 500,
        poll_s: float = 0.05,
    ) -> None:
        self._bootstrap = bootstrap
        self._codec = codec or Codec()
        self._batch_max = batch_max
        self._poll_s = poll_s
        self.source = topics.name("dp-budget-log")
        self.decisions = topics.name("dp-decisions")
        self.dead = topics.dlq(self.source)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 3000,
                "partition.assignment.strategy": "cooperative-sticky",
            }
        )
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "transactional.id": f"{group}-dp-{uuid.uuid4().hex[:12]}",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                "transaction.timeout.ms": 10000,
            }
        )
        self._producer.init_transactions(60)
        self.metrics = AgentMetrics()  # issue 11: served by main() at --metrics-port
        self.batches = self.metrics.batches(AGENT_NAME, group)
        self._parts: dict[int, dict[str, Budget]] = {}
        self.assigned = threading.Event()
        self.decided = 0

    # -- assignment -------------------------------------------------------------------------

    def _on_assign(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, 30) if partitions else []
        for tp in committed:
            self._parts[tp.partition] = self._rebuild(tp.partition, max(tp.offset, 0))
        consumer.incremental_assign(partitions)
        self.assigned.set()

    def _on_revoke(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._parts.pop(tp.partition, None)
        consumer.incremental_unassign(partitions)

    def _rebuild(self, partition: int, upto: int) -> dict[str, Budget]:
        """The budgets of one partition: the fold of its budget log below the committed offset."""
        budgets: dict[str, Budget] = {}
        if upto == 0:
            return budgets
        records = read_to_end(self._bootstrap, [self.source], 120.0, partitions={partition}, strict=True)
        for _t, offset, msg in sorted(records, key=lambda r: r[1]):
            if offset >= upto:
                break
            try:
                self._apply(budgets, self._codec.decode(msg.value()))
            except Exception:  # dead-lettered when first consumed; skipped the same way now
                continue
        log.info("dp budgets of partition %d rebuilt from %d records: %d budgets", partition, upto, len(budgets))
        return budgets

    @staticmethod
    def _apply(budgets: dict[str, Budget], event: Event) -> Event | None:
        if not isinstance(event, DpBudgetGranted | DpQueryRequested):
            raise PoisonEvent("wrong-topic", f"{event.event_type} is not on the budget log")
        key = event.budget_key
        try:
            state, out = fold(budgets.get(key), event)
        except GrantRejected as exc:
            log.warning("dp grant %s for %s not applied: %s", event.envelope.event_id, key, exc)
            return None
        if state is not None:
            budgets[key] = state
        return out

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._consumer.subscribe([self.source], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not stop.is_set():
                self.step()
                self.batches.sample_lag(self._consumer)
        finally:
            self._consumer.close()
            self._producer.flush(10)

    def step(self) -> int:
        """One batch in one transaction; the number of records consumed."""
        msgs = [m for m in self._consumer.consume(self._batch_max, self._poll_s) if self._usable(m)]
        if not msgs:
            return 0
        # issue 11: one span per transaction, linked to the requests of its records
        with telemetry.batch_span(AGENT_NAME, topic=self.source, headers=(m.headers() for m in msgs)):
            return self._transact(msgs)

    def _transact(self, msgs: list[Message]) -> int:
        started = time.perf_counter()
        snapshot = {p: dict(b) for p, b in self._parts.items()}
        try:
            self._producer.begin_transaction()
            for msg in msgs:
                self._fold(msg)
            self._producer.send_offsets_to_transaction(
                self._consumer.position(self._consumer.assignment()), self._consumer.consumer_group_metadata(), 30
            )
            self._producer.commit_transaction(60)
        except KafkaException as exc:
            log.warning("dp budget transaction failed, rewinding: %s", exc)
            self.batches.aborted()
            self._abort(snapshot)
            return 0
        self.batches.committed(len(msgs), started)
        self.decided += len(msgs)
        return len(msgs)

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("dp budget consumer: %s", err)
        return False

    def _abort(self, snapshot: dict[int, dict[str, Budget]]) -> None:
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            log.error("dp budget could not abort (%s); exiting so the supervisor restarts a clean worker", exc)
            raise
        for p, budgets in snapshot.items():
            if p in self._parts:
                self._parts[p] = budgets
        for tp in self._consumer.committed(self._consumer.assignment(), 30):
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else 0))

    def _fold(self, msg: Message) -> None:
        partition = msg.partition() or 0
        budgets = self._parts.get(partition)
        if budgets is None:  # revoked while this batch was fetched: its new owner decides it
            return
        try:
            out = self._apply(budgets, self._codec.decode(msg.value()))
        except PoisonEvent as exc:
            self._dead_letter(msg, exc.reason, exc.detail)
            return
        except Exception as exc:  # a valid record the fold cannot apply: never stop on it (replay skips it too)
            log.exception("dp budget fold failed on %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
            self._dead_letter(msg, "fold-refused", f"{type(exc).__name__}: {exc}")
            return
        if out is not None:
            self._producer.produce(
                self.decisions, key=msg.key(), value=self._codec.encode(out), partition=partition,
                headers=telemetry.trace_headers(out.envelope.trace_parent),
            )  # fmt: skip

    def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        self.batches.count("dead_letter")
        letter = DeadLetter(
            reason, detail, msg.topic() or self.source, msg.partition() or 0, msg.offset() or 0,
            AGENT_NAME, datetime.now(UTC), msg.key(), msg.value(),
        )  # fmt: skip
        headers: list[tuple[str, str | bytes | None]] = list(letter.headers())
        self._producer.produce(self.dead, key=msg.key(), value=msg.value() or b"", headers=headers)


def main(argv: list[str] | None = None) -> int:
    """`python -m agents.dp_budget`: one DP budget worker, configured from ledgerflow settings."""
    from ledgerflow.settings import load

    parser = argparse.ArgumentParser(prog="python -m agents.dp_budget")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    settings = load()
    telemetry.start("dp-budget", settings, level=args.loglevel.upper())
    topics = Topics(settings.topic_prefix, settings.partitions)
    worker = DpBudgetWorker(settings.bootstrap, f"{settings.worker_id}-dp-budget", topics)
    serve(worker.metrics.registry, args.metrics_host, args.metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    worker.run(stop)
    log.info("dp budget worker stopped after %.0f s, %d records decided", time.monotonic() - started, worker.decided)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
