"""Replay's reading alone: confluent-kafka Messages vs the C reader's runs (issue 10, session 8).

Run: .venv/bin/python bench/bench_kafka_reader.py --bootstrap 127.0.0.1:19560 [--events 500000] [--reps 3]
     [--replay-reps 0]

Produces `--events` realistic facts (bench_sink's producer: five fact types, 50 tenants) on a
fresh catalogue topic set, then reads all of them, `--reps` times, alternating who goes first,
with replay's consumer configuration (`sink_consumer_config` + READER_FETCH, read_committed,
partition EOF), every partition assigned from its start:

- `messages`: confluent-kafka's `consume(10000)` and the per-record work `Sink._take_batch` does
  before its per-stretch step (error check, offsets, values, keys, topic/partition and header
  `groupby`): the driver's intake cost per record without the routes;
- `runs`: `RunConsumer.read_runs(10000)` and a loop over the runs (the Sink's per-run step is
  the same Python as `_take_batch`'s per-stretch step).

Prints events/s (first record to last) and CPU µs/event (this process, every thread: librdkafka's
fetcher included). No ClickHouse: the driver's side only, which the replay's inserter competes with.

`--replay-reps N` (0: skip): then N whole replays (`ReplayJob`, every table, a fresh chDB database
each) of the same records, alternating `reader` (this tree as it is) and `messages` (this tree with
`LEDGERFLOW_RDKAFKA` pointing nowhere, so the replay takes confluent-kafka's Consumer and
`_take_batch`): the A/B of the reader alone, same code otherwise. Each prints events/s end to end,
the phases, and the CPU per event of each thread group (`/proc/self/task`, sampled every 20 ms):
overall and from the moment the replay starts consuming (driver = the main thread, `python` = the
inserter, `ThreadPool` = chDB's workers, `rdk:*` = librdkafka's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from itertools import groupby, islice
from operator import itemgetter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sink import produce
from confluent_kafka import Message, TopicPartition

from projections import kafka_reader
from projections.kafka_reader import RunConsumer
from projections.replay import ReplayJob, ReplayRequest, end_offsets, known_tables
from projections.sink import sink_consumer_config, tune_gc
from projections.store import open_store
from streams.admin import admin, ensure_topics
from streams.clients import Consumer
from streams.log_scan import READER_FETCH
from streams.topics import Topics

_HEADER = itemgetter(slice(0, 10))


def _conf(bootstrap: str) -> dict[str, Any]:
    return sink_consumer_config(
        bootstrap, f"bench-reader-{uuid.uuid4().hex[:8]}", {"enable.partition.eof": True, **READER_FETCH}
    )


def _messages(consumer: Consumer) -> int:
    msgs: list[Message] = consumer.consume(10000, 0.5)
    errors = list(map(Message.error, msgs))
    offsets = list(map(Message.offset, msgs))
    values = list(map(Message.value, msgs))
    keys = list(map(Message.key, msgs))
    coordinates = zip(map(Message.topic, msgs), map(Message.partition, msgs), strict=True)
    end = 0
    for _tp, same in groupby(coordinates):
        start, end = end, end + len(list(same))
        offs = offsets[start:end]
        assert all(map(int.__lt__, offs, islice(offs, 1, None)))  # type: ignore[arg-type]
        for _header, hs in groupby(map(_HEADER, values[start:end])):  # type: ignore[arg-type]
            len(list(hs))
    del keys
    return sum(e is None for e in errors)


def _runs(consumer: RunConsumer) -> int:
    n = 0
    for item in consumer.read_runs(10000, 0.5):
        if len(item) == 6 and type(item[0]) is str:
            n += len(item[3])
        elif len(item) == 5:
            n += 1
    return n


def read_all(name: str, bootstrap: str, topics: Topics, n: int) -> tuple[float, float]:
    """Seconds from the first record to the n-th, and CPU seconds meanwhile."""
    conf = _conf(bootstrap)
    consumer: Any = RunConsumer(conf) if name == "runs" else Consumer(conf)
    step: Callable[[Any], int] = _runs if name == "runs" else _messages
    try:
        bounds = end_offsets(bootstrap, topics.all(), consumer=consumer)
        consumer.assign([TopicPartition(t, p, lo) for (t, p), (lo, hi) in sorted(bounds.items()) if hi > lo])
        seen = 0
        t0: float | None = None
        c0 = 0.0
        while seen < n:
            got = step(consumer)
            if got and t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            seen += got
        assert t0 is not None and seen == n, seen
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        consumer.close()


_HZ = os.sysconf("SC_CLK_TCK")


def _threads() -> dict[int, tuple[str, float]]:
    """tid → (thread name, CPU seconds so far) of every thread of this process."""
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / _HZ)
    return out


def _by_group(now: dict[int, tuple[str, float]], then: dict[int, tuple[str, float]], skip: int) -> dict[str, float]:
    groups: dict[str, float] = {}
    for tid, (name, cpu) in now.items():
        if tid == skip:
            continue
        key = "driver" if tid == os.getpid() else ("rdk:*" if name.startswith("rdk:") else name)
        groups[key] = groups.get(key, 0.0) + cpu - then.get(tid, (name, 0.0))[1]
    return groups


def replay_ab(how: str, url: str, bootstrap: str, topics: Topics, n: int) -> float:
    """One whole replay through the reader or (`messages`) through confluent-kafka; events/s."""
    if how == "messages":
        os.environ[kafka_reader.PATH_ENV] = "/nonexistent/librdkafka.so.1"
    else:
        os.environ.pop(kafka_reader.PATH_ENV, None)
    into = f"bench_reader_{uuid.uuid4().hex[:8]}"
    job = ReplayJob(ReplayRequest(into, tuple(known_tables())), store_url=url, bootstrap=bootstrap, topics=topics)
    before = _threads()
    last: dict[int, tuple[str, float]] = {}
    at_consuming: dict[int, tuple[str, float]] = {}
    phases: dict[str, float] = {}
    stop = threading.Event()
    sampler_tid = [0]

    def sample() -> None:
        sampler_tid[0] = threading.get_native_id()
        prev = time.perf_counter()
        while not stop.wait(0.02):
            last.update(_threads())
            phase, now = job.status()["phase"], time.perf_counter()
            phases[phase] = phases.get(phase, 0.0) + now - prev
            prev = now
            if phase == "consuming" and not at_consuming:
                at_consuming.update(last)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        status = job.run()
    finally:
        stop.set()
        sampler.join()
        os.environ.pop(kafka_reader.PATH_ENV, None)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    last.update(_threads())
    assert int(status["rows"]) + int(status["dead_letters"]) == n, status

    def show(groups: dict[str, float]) -> str:
        top = sorted(groups.items(), key=lambda kv: -kv[1])[:4]
        return ", ".join(f"{k} {v / n * 1e6:.2f}" for k, v in top)

    print(
        f"replay {how:8s} {n / secs:>10,.0f} events/s  ({secs:.2f} s, cpu {cpu / n * 1e6:.2f} µs/event, "
        f"load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    print("    phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"    cpu µs/event by thread: {show(_by_group(last, before, sampler_tid[0]))}")
    if at_consuming:
        print(f"    cpu µs/event from consuming on: {show(_by_group(last, at_consuming, sampler_tid[0]))}")
    client = open_store(url, "default")
    client.command(f"DROP DATABASE IF EXISTS {into} SYNC")
    client.close()
    return n / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bootstrap", default="127.0.0.1:19292")
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--replay-reps", type=int, default=0, help="whole replays, reader vs messages (0: none)")
    args = ap.parse_args()
    tune_gc()
    topics = Topics(prefix=f"bench-reader-{uuid.uuid4().hex[:8]}.", partitions=3)
    ensure_topics(args.bootstrap, topics)
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}")
    try:
        secs = produce(args.bootstrap, topics, args.events)
        print(f"produced {args.events:,} events in {secs:.1f} s")
        results: dict[str, list[tuple[float, float]]] = {"messages": [], "runs": []}
        for r in range(args.reps):
            for name in ("messages", "runs") if r % 2 == 0 else ("runs", "messages"):
                wall, cpu = read_all(name, args.bootstrap, topics, args.events)
                results[name].append((wall, cpu))
                print(
                    f"{name:9s} {args.events / wall:>12,.0f} events/s  cpu {cpu / args.events * 1e6:.2f} µs/event"
                    f"  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        (mw, mc), (rw, rc) = ([sum(x) / len(x) for x in zip(*results[k], strict=True)] for k in ("messages", "runs"))
        print(f"runs vs messages: {mw / rw:.2f}x events/s, {mc / rc:.2f}x less CPU per event (means)")
        if args.replay_reps:
            chdb_dir = tempfile.mkdtemp(prefix="bench-reader-chdb-")
            try:
                url = f"chdb://{chdb_dir}"
                open_store(url, "default").close()  # chDB's start-up, outside the first replay
                rates: dict[str, list[float]] = {"reader": [], "messages": []}
                for r in range(args.replay_reps):
                    how = ("reader", "messages")[(r + r // 2) % 2]  # r, m, m, r, r, m, ...
                    rates[how].append(replay_ab(how, url, args.bootstrap, topics, args.events))
                if rates["reader"] and rates["messages"]:
                    mean = {k: sum(v) / len(v) for k, v in rates.items()}
                    print(f"replay, reader vs messages: {mean['reader'] / mean['messages']:.2f}x events/s (means)")
            finally:
                shutil.rmtree(chdb_dir, ignore_errors=True)
    finally:
        client = admin(args.bootstrap)
        client.delete_topics(topics.all(), operation_timeout=30)


if __name__ == "__main__":
    main()
