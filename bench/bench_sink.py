"""The projection sink and replay through the real broker into chDB (issue 10, Performance).

Run: .venv/bin/python bench/bench_sink.py [--events 1000000] [--bootstrap 127.0.0.1:19292]
     [--row-events 200000] [--fresh-rate 5000] [--fresh-seconds 20] [--fresh-sinks 5000/200,20000/200]
     [--sink-batches 5000/200,20000/200] [--skip-replay] [--baseline DIR] [--block-rows 50000]
     [--pair-rows 50000] [--replay-only [--replay-reps 3] [--replay-batch-max N]]

`--baseline DIR`: DIR holds another checkout (e.g. `git archive HEAD | tar -x -C DIR`); its
`projections/sink.py` and `avro_block.py` are loaded beside this tree's and every sink,
replay and freshness row is measured for both, alternately, on the same records. A batch size
named twice in `--sink-batches` is measured twice; the summary gives the mean of the samples.

Needs a running broker; creates its own topics under a unique prefix (`bench-sink-<hex>.`),
its own chDB directory (a temporary one, or --chdb DIR), and deletes the topics and groups at
the end. Everything is measured in ONE run, side by side, so the ratios hold on a noisy
machine even where the absolute figures do not:

1. Produce `--events` realistic facts (tests/factories builders: RequestReceived,
   PolicyDecided, TokensCharged, AuditRecorded, TenantTotalsUpdated in equal parts, 50 tenants,
   each event built and encoded on its own: distinct ids, Decimal money) across the catalogue
   topics (3 partitions each), non-transactional idempotent producer.
1b. One block alone (`--block-rows`, 0 to skip): a block of that many records of each fact
   type inserted by each avro_block (baseline, ours) alternately, median wall and CPU time of
   `--block-reps` inserts (the insert without Kafka or the driver; also warms chDB up).
1c. Two inserts at once (`--pair-rows`, 0 to skip): a TokensCharged and a RequestReceived block
   inserted one after the other on one chDB handle, then from two threads on two handles at
   once (median of `--block-reps`), and how many cores a process gets at that moment (round
   four: whether several inserts in flight can pay off here).
2. Bare loop: a confluent-kafka consumer (the sink's own fetch settings, read_committed) that
   only consumes and counts, `consume(10000)` at a time, until it has seen every record. Also
   with librdkafka's default fetch settings, for reference.
3. The sink, fast path (Avro blocks into chDB), live defaults (batch_max 5000, batch_ms 200)
   and replay-sized batches (20000 / 1000 ms): from the first record consumed to the last
   row landed; the tables are counted afterwards (every event exactly once).
4. The sink's row path (`fast=False`: Codec decode + row insert, what issue 10 started from)
   on the first `--row-events` records of the same topics.
5. Replay (`projections.replay.ReplayJob`, i.e. `ledgerflow replay`'s job) of every table
   into a fresh database (a baseline row runs the baseline's own `replay.py` with its own Sink
   and `Keep`): rows/s from its start to done (migrations and the end-offset capture
   included), the wall seconds of each of the job's phases, then `check` against the sink's
   database (must be equal). `--replay-only`: produce, then only `--replay-reps` rounds of
   replays (alternating who goes first), each checked against the first replay's database.
6. Freshness: a separate producer process sends `--fresh-rate` events/s for `--fresh-seconds`
   with `occurred_at` = the moment of sending, while one sink (each `--fresh-sinks`
   batch_max/batch_ms) runs in a thread; each
   row's `_ingested_at` (set by ClickHouse when the insert lands) minus its `occurred_at` is
   its produced → visible time; p50/p95/max over all rows.

Rates are events per second of wall time in this process (its Python thread drives the
consumer; librdkafka's and chDB's threads run beside it). Each bare, sink and replay row also
gives this process's CPU time per event (every thread, chDB's background merges included):
other processes' load stretches wall time far more than CPU time, so on a shared box the CPU
figures compare old and new more steadily.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, Producer

import projections.replay as replay_module
from projections import avro_block
from projections.migrations import migrate
from projections.replay import check, known_tables
from projections.schema import DEAD_LETTERS, event_tables, table_for
from projections.sink import Sink, tune_gc
from projections.store import open_store
from streams.admin import admin, ensure_topics
from streams.codec import Codec
from streams.events import Event
from streams.topics import Topics
from tests import factories

BUILDERS = (factories.request, factories.decision, factories.charge, factories.audit, factories.totals)
TENANTS = [f"tenant-{i:02d}" for i in range(50)]
SINK_FETCH = {
    "queued.max.messages.kbytes": 32768,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    "fetch.max.bytes": 32 * 1024 * 1024,
    "fetch.wait.max.ms": 100,
}


def load_baseline(tree: Path) -> tuple[type[Sink], Any]:
    """The Sink class of another checkout and its avro_block module, loaded beside ours (the rest shared)."""
    import types

    ab = types.ModuleType("baseline_avro_block")
    sys.modules[ab.__name__] = ab
    src = (tree / "projections" / "avro_block.py").read_text()
    exec(compile(src, str(tree / "projections" / "avro_block.py"), "exec"), ab.__dict__)
    sk = types.ModuleType("baseline_sink")
    sys.modules[sk.__name__] = sk
    src = (tree / "projections" / "sink.py").read_text()
    src = src.replace("from projections import avro_block\n", "import baseline_avro_block as avro_block\n")
    exec(compile(src, str(tree / "projections" / "sink.py"), "exec"), sk.__dict__)
    cls: type[Sink] = sk.Sink
    rp = types.ModuleType("baseline_replay")
    sys.modules[rp.__name__] = rp
    src = (tree / "projections" / "replay.py").read_text()
    # (any import list: since session 7 replay.py also takes sink_consumer_config from the sink)
    src = src.replace("from projections.sink import ", "from baseline_sink import ")
    exec(compile(src, str(tree / "projections" / "replay.py"), "exec"), rp.__dict__)
    BASELINE_REPLAY[0] = rp
    return cls, ab


REPLAY_BATCH_MAX: list[int] = [0]  # --replay-batch-max (0: each ReplayJob's default)
BASELINE_REPLAY: list[Any] = [None]  # the baseline's projections.replay module (load_baseline), if any


def replay_once(name: str, cls: type[Sink], url: str, bootstrap: str, topics: Topics, into: str) -> dict[str, Any]:
    """One ReplayJob of every table into `into`: the baseline's own job (and Sink) for a baseline
    row, else this tree's (an "avro " row with LEDGERFLOW_NATIVE=0). Leaves its CPU seconds in CPU[0]."""
    module = BASELINE_REPLAY[0] if name == "baseline " else replay_module
    job = module.ReplayJob(
        module.ReplayRequest(into, tuple(known_tables())),
        store_url=url,
        bootstrap=bootstrap,
        topics=topics,
        **({"batch_max": REPLAY_BATCH_MAX[0]} if REPLAY_BATCH_MAX[0] else {}),
    )
    phases: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:  # wall time per phase of the job's status, sampled every 5 ms
        last = time.perf_counter()
        while not stop.wait(0.005):
            now = time.perf_counter()
            phase = job.status()["phase"]
            phases[phase] = phases.get(phase, 0.0) + now - last
            last = now

    sampler = threading.Thread(target=sample, daemon=True)
    t0, c0 = time.perf_counter(), time.process_time()
    sampler.start()
    try:
        with path_env(name):
            status: dict[str, Any] = job.run()
    finally:
        stop.set()
        sampler.join()
    status["secs"] = time.perf_counter() - t0
    CPU[0] = time.process_time() - c0
    status["phases"] = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    return status


def replay_rows(
    impls: list[tuple[str, type[Sink]]], url: str, bootstrap: str, topics: Topics, n: int, reps: int,
    record: Any, reference: str | None,
) -> None:  # fmt: skip
    """`reps` rounds of one replay per implementation (alternating who goes first); each rebuilt
    database is checked against `reference` (the sink's database, or else the first replay's)
    and then dropped. Why its own step: replay's fixed costs (migrations, end offsets, the
    group join or the assignment) are part of what `ledgerflow replay` costs, so it is timed
    end to end, and side by side with the baseline in one run (the box is shared)."""
    ref_client = open_store(url, "default")

    def run_sql(sql: str) -> str:
        return bytes(ref_client.raw_query(sql, fmt="TabSeparated")).decode()

    made: list[str] = []
    try:
        for r in range(reps):
            for name, cls in impls if r % 2 == 0 else impls[::-1]:
                into = f"bench_replay_{uuid.uuid4().hex[:8]}"
                made.append(into)
                status = replay_once(name, cls, url, bootstrap, topics, into)
                secs = status["secs"]
                rows = int(status["rows"]) + int(status["dead_letters"])
                assert rows == n, status
                label = f"{name}replay"
                record(label, n / secs)
                record(label + " cpu", CPU[0] / n * 1e6)
                print(
                    f"{name + 'replay (ReplayJob, all tables)':48s} {n / secs:>12,.0f} events/s  ({secs:.2f} s end to "
                    f"end, consuming at {status['rate_per_s']:,.0f} offsets/s, cpu {CPU[0] / n * 1e6:.1f} µs/event, "
                    f"load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                print(f"    seconds per phase: {status['phases']}")
                if reference is None:
                    reference = into
                    continue
                report = check(run_sql, reference, into)
                print(f"{name}replay --check against {reference}: {'equal' if report.equal else 'DIFFERENT'}")
                assert report.equal, report.render()
                ref_client.command(f"DROP DATABASE IF EXISTS {into} SYNC")
                made.remove(into)
    finally:
        for db in made:
            ref_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
        ref_client.close()


@contextlib.contextmanager
def path_env(name: str) -> Any:
    """LEDGERFLOW_NATIVE=0 while an "avro " row's Sink is built (a Sink reads it when constructed)."""
    old = os.environ.get(avro_block.NATIVE_ENV)
    if name.startswith("avro "):
        os.environ[avro_block.NATIVE_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(avro_block.NATIVE_ENV, None)
        else:
            os.environ[avro_block.NATIVE_ENV] = old


def block_insert(url: str, modules: list[tuple[str, Any]], rows: int, reps: int) -> dict[str, float]:
    """One `rows`-row Avro block per core fact type, inserted alone by each avro_block (old, new)
    alternately `reps` times into a fresh database; prints the medians (wall, and this process's
    CPU time, which other processes' load disturbs less). Also warms chDB up before the sink rows."""
    codec = Codec()
    db = f"bench_block_{uuid.uuid4().hex[:8]}"
    client = fresh_database(url, db)
    out: dict[str, float] = {}
    try:
        for kind, builder in enumerate(BUILDERS):
            values = [codec.encode(builder(tenant=TENANTS[i % len(TENANTS)])) for i in range(rows)]
            made = []
            for name, ab in modules:
                writer = ab.writers()[values[0][:10]]
                table = table_for(writer.event_type)
                found = client.query(ab.TABLE_TYPES_SQL, parameters={"tables": [table]}).result_rows
                plan = ab.plan(writer, ab.table_types(found)[table])
                made.append((name, ab, plan, ab.block(plan, "bench", 0, list(range(rows)), values)))
            if avro_block.native_available() and made[-1][2].native is not None:  # ours, RowBinary from C
                made.append(("native", avro_block, made[-1][2], values))
            wall: dict[str, list[float]] = {m[0]: [] for m in made}
            cpu: dict[str, list[float]] = {m[0]: [] for m in made}
            for r in range(reps):
                for name, ab, plan, data in made if r % 2 == 0 else made[::-1]:
                    params = ab.parameters("bench", 0, 0, rows - 1, token=f"{name}-{kind}-{r}")
                    t0, c0 = time.perf_counter(), time.process_time()
                    if name == "native":  # the transcode is timed too: it replaces building the Avro block
                        run = avro_block.Run(0, list(range(rows)), data)
                        rb = avro_block.native_block(plan, "bench", [run])
                        avro_block.insert_native(client, plan, rb, params["lf_token"])
                    else:
                        ab.insert_block(client, plan, data, params)
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            client.command(f"TRUNCATE TABLE {table}")
            med = {name: (statistics.median(wall[name]) * 1000, statistics.median(cpu[name]) * 1000) for name in wall}
            line = ", ".join(f"{name or 'avro'} {w:.0f} ms (cpu {c:.0f})" for name, (w, c) in med.items())
            print(f"one {rows:,}-row block into {table:24s} median of {reps}: {line}  load {os.getloadavg()[0]:.1f}")
            for name, *_ in made:
                out[f"{name}{table}"] = statistics.median(wall[name])
                out[f"{name}{table} cpu"] = statistics.median(cpu[name])
        if "native" in wall:
            tables = sorted({k.removeprefix("native").removesuffix(" cpu") for k in out if k.startswith("native")})
            w = sum(out[t] for t in tables) / sum(out[f"native{t}"] for t in tables)
            c = sum(out[f"{t} cpu"] for t in tables) / sum(out[f"native{t} cpu"] for t in tables)
            print(f"one block, all five tables: native (RowBinary) vs avro {w:.2f}x wall, {c:.2f}x cpu")
        if len(modules) == 2:
            old_name = modules[0][0]
            tables = sorted({k.removeprefix(old_name).removesuffix(" cpu") for k in out if k.startswith(old_name)})
            w = sum(out[old_name + t] for t in tables) / sum(out[t] for t in tables)
            c = sum(out[f"{old_name}{t} cpu"] for t in tables) / sum(out[f"{t} cpu"] for t in tables)
            print(f"one block, all five tables: new vs baseline {w:.2f}x wall, {c:.2f}x cpu")
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
        client.close()
    return out


def pair_insert(url: str, rows: int, reps: int) -> float:
    """Two `rows`-row blocks (TokensCharged, RequestReceived) inserted one after the other on one
    chDB handle, then at once from two threads on two handles, alternately `reps` times; prints
    the medians and returns sequential / concurrent wall time. Why: several inserts in flight
    (one inserter per topic) pay off only if chDB runs them at once AND a core is free for it;
    this separates the two from the sink's other costs. Also prints the CPU a process gets
    from two busy processes at that moment (the box is shared)."""
    codec = Codec()
    db = f"bench_pair_{uuid.uuid4().hex[:8]}"
    clients = [fresh_database(url, db), open_store(url, db)]
    try:
        made = []
        for builder in (factories.charge, factories.request):
            values = [codec.encode(builder(tenant=TENANTS[i % len(TENANTS)])) for i in range(rows)]
            writer = avro_block.writers()[values[0][:10]]
            table = table_for(writer.event_type)
            found = clients[0].query(avro_block.TABLE_TYPES_SQL, parameters={"tables": [table]}).result_rows
            plan = avro_block.plan(writer, avro_block.table_types(found)[table])
            made.append((plan, avro_block.block(plan, "bench", 0, list(range(rows)), values)))
        tokens = iter(range(1 << 30))

        def insert(client: Any, plan: Any, data: bytes) -> None:
            params = avro_block.parameters("bench", 0, 0, rows - 1, token=f"pair-{next(tokens)}")
            avro_block.insert_block(client, plan, data, params)

        seq: list[tuple[float, float]] = []
        par: list[tuple[float, float]] = []
        for r in range(reps):
            for mode in ("seq", "par") if r % 2 == 0 else ("par", "seq"):
                t0, c0 = time.perf_counter(), time.process_time()
                if mode == "seq":
                    for plan, data in made:
                        insert(clients[0], plan, data)
                else:
                    threads = [
                        threading.Thread(target=insert, args=(c, plan, data))
                        for c, (plan, data) in zip(clients, made, strict=True)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                (seq if mode == "seq" else par).append((time.perf_counter() - t0, time.process_time() - c0))
        ms = statistics.median(w for w, _ in seq) * 1000
        mp_ = statistics.median(w for w, _ in par) * 1000
        cs, cp = (statistics.median(c for _, c in x) * 1000 for x in (seq, par))
        print(
            f"two {rows:,}-row inserts, median of {reps}: one after the other {ms:.0f} ms (cpu {cs:.0f}), "
            f"at once from two threads {mp_:.0f} ms (cpu {cp:.0f}): {ms / mp_:.2f}x  load {os.getloadavg()[0]:.1f}"
        )
        with mp.get_context("spawn").Pool(2) as pool:
            one = pool.apply(_burn)
            t0 = time.perf_counter()
            pool.map(_burn, [0, 1])
            both = time.perf_counter() - t0
        print(f"cores a process gets now: {2 * one / both:.2f} (two busy processes vs one)")
        return ms / mp_
    finally:
        clients[0].command(f"DROP DATABASE IF EXISTS {db} SYNC")
        for c in clients:
            c.close()


def _burn(_: int = 0) -> float:
    """A fixed amount of pure-Python work; seconds it took."""
    t0 = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t0


def build(i: int, now: datetime | None = None) -> Event:
    e = BUILDERS[i % len(BUILDERS)](tenant=TENANTS[(i // len(BUILDERS)) % len(TENANTS)])
    if now is not None:
        e = dataclasses.replace(e, envelope=dataclasses.replace(e.envelope, occurred_at=now))
    return e


def produce(bootstrap: str, topics: Topics, n: int) -> float:
    codec = Codec()
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
        }
    )
    t0 = time.perf_counter()
    for i in range(n):
        e = build(i)
        value = codec.encode(e)
        while True:
            try:
                p.produce(topics.for_event(e.event_type), key=e.tenant.encode(), value=value)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    assert p.flush(120) == 0
    return time.perf_counter() - t0


CPU: list[float] = [0.0]  # this process's CPU seconds (every thread) of the last bare loop, sink or replay


def bare_loop(bootstrap: str, topics: Topics, n: int, tuned: bool) -> float:
    """Consume and count every record; seconds from the first record to the n-th."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }
    if tuned:
        conf.update(SINK_FETCH)
    c = Consumer(conf)
    c.subscribe(topics.all())
    seen = 0
    t0: float | None = None
    c0 = 0.0
    try:
        while seen < n:
            msgs = c.consume(10000, 1.0)
            if msgs and t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            for m in msgs:
                if m.error() is None:
                    seen += 1
        assert t0 is not None
        CPU[0] = time.process_time() - c0
        return time.perf_counter() - t0
    finally:
        c.close()


def run_sink(sink: Sink, n: int, timeout: float = 600.0) -> float:
    """Drive `sink` until it landed n rows; seconds from the first record consumed.

    Also leaves in CPU[0] the CPU seconds this process spent meanwhile (driver, inserter, chDB's
    and librdkafka's threads): on a shared box, other processes' load stretches the wall time
    far more than the CPU time, so CPU µs per event compares old and new more steadily."""
    t0: float | None = None
    c0 = 0.0
    deadline = time.monotonic() + timeout
    while sink.rows_inserted + sink.dead_lettered < n:
        got = sink.poll_once(0.1)
        if got and t0 is None:
            t0, c0 = time.perf_counter(), time.process_time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"sink stalled: {sink.status()}")
    assert t0 is not None
    CPU[0] = time.process_time() - c0
    return time.perf_counter() - t0


def table_counts(client: Any) -> dict[str, int]:
    tables = sorted({*event_tables().values(), DEAD_LETTERS})
    rows = client.query(
        "SELECT table, toUInt64(sum(rows)) FROM system.parts WHERE active AND database = currentDatabase() "
        "AND table IN {t:Array(String)} GROUP BY table",
        parameters={"t": tables},
    ).result_rows
    return {str(t): int(c) for t, c in rows if int(c)}


def fresh_database(url: str, name: str) -> Any:
    client = open_store(url, name)
    migrate(client, name)
    return client


def steady_producer(bootstrap: str, prefix: str, partitions: int, rate: int, seconds: float, sent: Any) -> None:
    """(In a child process) `rate` events/s for `seconds`, occurred_at = when each is sent; `sent` gets the count."""
    topics = Topics(prefix=prefix, partitions=partitions)
    codec = Codec()
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    start = time.perf_counter()
    i = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while i < due:
            e = build(i, datetime.now(UTC))
            p.produce(topics.for_event(e.event_type), key=e.tenant.encode(), value=codec.encode(e))
            i += 1
        p.poll(0)
        time.sleep(0.002)
    p.flush(30)
    sent.value = i


def main() -> None:
    tune_gc()  # as the projections service does at start (both sides of every comparison run with it)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--bootstrap", default="127.0.0.1:19292")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--row-events", type=int, default=200_000, help="records for the row path (0: skip)")
    ap.add_argument("--fresh-rate", type=int, default=5000)
    ap.add_argument("--fresh-seconds", type=float, default=20.0)
    ap.add_argument("--fresh-sinks", default="20000/200", help="batch_max/batch_ms sinks to measure freshness of")
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument(
        "--replay-only",
        action="store_true",
        help="produce, then only the replay rows (--replay-reps rounds, checked against the first replay)",
    )
    ap.add_argument("--replay-reps", type=int, default=1, help="replays per implementation")
    ap.add_argument("--replay-batch-max", type=int, default=0, help="ReplayJob batch_max, both sides (0: default)")
    ap.add_argument("--sink-batches", default="5000/200,20000/200", help="batch_max/batch_ms runs")
    ap.add_argument("--chdb", default=None, help="chDB directory (default: a temporary one, removed)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to measure side by side")
    ap.add_argument("--block-rows", type=int, default=50_000, help="rows of the one-block insert rows (0: skip)")
    ap.add_argument("--block-reps", type=int, default=5, help="inserts of each one-block row")
    ap.add_argument("--pair-rows", type=int, default=50_000, help="rows of the two-inserts-at-once row (0: skip)")
    ap.add_argument(
        "--no-avro-path",
        action="store_true",
        help="skip this tree's Avro-block rows (LEDGERFLOW_NATIVE=0) measured beside the native (RowBinary) ones",
    )
    args = ap.parse_args()
    n = args.events
    REPLAY_BATCH_MAX[0] = args.replay_batch_max
    impls: list[tuple[str, type[Sink]]] = [("", Sink)]
    blocks: list[tuple[str, Any]] = [("", avro_block)]
    if args.baseline is not None:
        old_sink, old_avro_block = load_baseline(args.baseline)
        impls = [("baseline ", old_sink), ("", Sink)]
        blocks = [("baseline ", old_avro_block), ("", avro_block)]
    if avro_block.native_enabled() and not args.no_avro_path:
        impls.insert(0, ("avro ", Sink))  # this tree with LEDGERFLOW_NATIVE=0 (see `path_env`)
    prefix = f"bench-sink-{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix=prefix, partitions=args.partitions)
    fresh_topic_sets: list[Topics] = []
    ensure_topics(args.bootstrap, topics)
    chdb_dir = args.chdb or tempfile.mkdtemp(prefix="bench-sink-chdb-")
    url = f"chdb://{chdb_dir}"
    groups: list[str] = []
    samples: dict[str, list[float]] = {}  # a row measured several times (--sink-batches repeats) keeps each
    results: dict[str, float] = {}  # label → mean of its samples

    def record(label: str, value: float) -> None:
        samples.setdefault(label, []).append(value)
        results[label] = statistics.fmean(samples[label])

    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    try:
        secs = produce(args.bootstrap, topics, n)
        print(f"produced {n:,} events in {secs:.1f} s ({n / secs:,.0f}/s, build + encode + produce)")

        if args.replay_only:
            fresh_database(url, "bench_warm").command("DROP DATABASE IF EXISTS bench_warm SYNC")  # chDB start-up
            replay_rows(impls, url, args.bootstrap, topics, n, args.replay_reps, record, None)
            args.block_rows = args.pair_rows = 0
            args.skip_replay, args.row_events, args.sink_batches, args.fresh_sinks = True, 0, "", ""
        if args.block_rows:
            block_insert(url, blocks, args.block_rows, args.block_reps)
        if args.pair_rows:
            pair_insert(url, args.pair_rows, args.block_reps)

        for tuned in (True, False) if not args.replay_only else ():
            secs = bare_loop(args.bootstrap, topics, n, tuned)
            key = "bare" if tuned else "bare (librdkafka default fetch)"
            record(key, n / secs)
            print(f"{key:48s} {n / secs:>12,.0f} events/s  ({secs:.2f} s, cpu {CPU[0] / n * 1e6:.1f} µs/event)")

        live_db, live_client = "", None
        specs = [x for x in args.sink_batches.split(",") if x]
        for k, spec in enumerate(specs):
            batch_max, batch_ms = (int(x) for x in spec.split("/"))
            # alternate who goes first, and drop each database after its run: background merges
            # of an earlier run's parts must not weigh on the next one
            for name, cls in impls if k % 2 == 0 else impls[::-1]:
                label = f"{name}sink fast path, {batch_max}/{batch_ms}ms"
                db = f"bench_{uuid.uuid4().hex[:8]}"
                client = fresh_database(url, db)
                group = f"bench-sink-{uuid.uuid4().hex[:8]}"
                groups.append(group)
                with path_env(name):
                    sink = cls(args.bootstrap, group, topics, client, batch_max=batch_max, batch_ms=batch_ms)
                secs = run_sink(sink, n)
                status = sink.status()
                sink.close()
                counts = table_counts(client)
                assert sum(counts.values()) == n, counts
                assert status["fast_rows"] == n, status
                record(label, n / secs)
                record(label + " cpu", CPU[0] / n * 1e6)
                print(
                    f"{label:48s} {n / secs:>12,.0f} events/s  ({secs:.2f} s, {status['batches']} inserts, "
                    f"{status['fast_fallbacks']} refused, {status.get('native_rows', 0):,} native, "
                    f"{n / secs / results['bare']:.0%} of bare, "
                    f"cpu {CPU[0] / n * 1e6:.1f} µs/event, load {os.getloadavg()[0]:.1f})"
                )
                if not name and k == len(specs) - 1:
                    live_db, live_client = db, client
                else:
                    client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
                    client.close()

        if args.row_events:
            m = min(args.row_events, n)
            db = f"bench_{uuid.uuid4().hex[:8]}"
            client = fresh_database(url, db)
            group = f"bench-rows-{uuid.uuid4().hex[:8]}"
            groups.append(group)
            sink = Sink(args.bootstrap, group, topics, client, batch_max=5000, batch_ms=200, fast=False)
            secs = run_sink(sink, m)
            sink.close()
            record("row path", m / secs)
            print(
                f"{'sink row path (fast=False), 5000/200ms':48s} {m / secs:>12,.0f} events/s  ({secs:.2f} s over "
                f"{m:,}, {m / secs / results['bare']:.0%} of bare)"
            )
            client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
            client.close()

        if not args.skip_replay:
            assert live_client is not None
            replay_rows(impls, url, args.bootstrap, topics, n, args.replay_reps, record, live_db)

        # freshness: produced → visible at a steady rate
        for spec in [x for x in args.fresh_sinks.split(",") if x]:
            batch_max, batch_ms = (int(x) for x in spec.split("/"))
            for name, cls in impls:
                ftopics = Topics(prefix=f"{prefix}fresh{len(fresh_topic_sets)}.", partitions=args.partitions)
                ensure_topics(args.bootstrap, ftopics)
                fresh_topic_sets.append(ftopics)
                db = f"bench_{uuid.uuid4().hex[:8]}"
                client = fresh_database(url, db)
                group = f"bench-fresh-{uuid.uuid4().hex[:8]}"
                groups.append(group)
                with path_env(name):
                    sink = cls(args.bootstrap, group, ftopics, client, batch_max=batch_max, batch_ms=batch_ms)
                stop = threading.Event()
                runner = threading.Thread(target=sink.run, args=(stop,), daemon=True)
                runner.start()
                sink.assigned.wait(30)
                ctx = mp.get_context("spawn")
                sent = ctx.Value("l", 0)
                proc = ctx.Process(
                    target=steady_producer,
                    args=(args.bootstrap, ftopics.prefix, args.partitions, args.fresh_rate, args.fresh_seconds, sent),
                )
                proc.start()
                proc.join()
                want = int(sent.value)
                deadline = time.monotonic() + 60
                while sink.rows_inserted < want and time.monotonic() < deadline:
                    time.sleep(0.2)
                stop.set()
                runner.join(30)
                tables = sorted(set(event_tables().values()))
                union = " UNION ALL ".join(
                    f"SELECT dateDiff('millisecond', occurred_at, _ingested_at) AS ms FROM {t}" for t in tables
                )
                (cnt, p50, p95, p99, mx), *_ = client.query(
                    f"SELECT count(), quantileExact(0.5)(ms), quantileExact(0.95)(ms), quantileExact(0.99)(ms), "
                    f"max(ms) FROM ({union})"
                ).result_rows
                print(
                    f"{name}freshness, {batch_max}/{batch_ms}ms, {args.fresh_rate:,}/s for {args.fresh_seconds:.0f} s "
                    f"({cnt:,} rows): produced → visible p50 {p50} ms, p95 {p95} ms, p99 {p99} ms, max {mx} ms, "
                    f"load {os.getloadavg()[0]:.1f}"
                )
                client.close()
        print()
        for label, v in results.items():
            if not label.startswith("bare") and not label.endswith(" cpu"):
                k = len(samples[label])
                of_bare = f"{v / results['bare']:.2f} x bare loop" if "bare" in results else f"{v:,.0f}"
                print(f"{label:48s} {of_bare}" + (f" (mean of {k})" if k > 1 else ""))
        for other in ("baseline ", "avro "):
            vs = "new vs baseline" if other == "baseline " else "native vs avro path"
            for label, v in results.items():
                ours = label.removeprefix(other)
                if ours != label and ours in results:
                    if label.endswith(" cpu"):  # µs per event: less is better
                        print(f"{ours + ': ' + vs:48s} {v / results[ours]:.2f} x less CPU per event")
                    else:
                        print(f"{ours + ': ' + vs:48s} {results[ours] / v:.2f} x")
    finally:
        try:
            client_admin = admin(args.bootstrap)
            names = [n for t in (topics, *fresh_topic_sets) for n in (*t.all(), *(t.dlq(x) for x in t.all()))]
            for fut in client_admin.delete_topics(names, operation_timeout=30).values():
                with contextlib.suppress(Exception):  # a DLQ topic nobody created
                    fut.result(30)
            for fut in (client_admin.delete_consumer_groups(groups, request_timeout=10) if groups else {}).values():
                with contextlib.suppress(Exception):
                    fut.result(10)
        finally:
            if args.chdb is None:
                shutil.rmtree(chdb_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
