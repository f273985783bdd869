"""Bulk reads of whole topics for replays that must be fast: the ledger's `audit verify`,
`audit prove` and the ledger worker's head rebuild read millions of records from offset 0.

- `scan_to_end` streams every committed record up to the end offsets seen at the start,
  in large batches, without keeping them (`streams.admin.read_to_end` returns a list of
  every Message: GiBs at millions of records), optionally only the records
  with given keys (events are keyed by tenant: a per-tenant read skips the others' records
  before they are decoded).
- `compile_extractor` compiles a reader of only some fields of a record (dotted paths such
  as "envelope.tenant") into a tuple: the other fields are skipped by their lengths, not
  decoded, and no event, dict or envelope check is made. The body must still be well formed
  Avro of the schema to its last byte (else AvroDecodeError), and the fields taken are
  decoded exactly as fastavro does (UTF-8 checked, timestamps as UTC datetimes).
- `RecordReaders` holds such extractors (or, where every field is wanted, the compiled
  reader of `streams.avro_fast` giving a plain dict) for today's schema of some event types,
  by their single-object header; bytes of any other schema (an older release) give None and
  the caller uses `Codec.decode`.

What is skipped is the consumer-side validation `Codec.decode` adds (tenant present, ids
well formed, a sane time): `audit verify` checks hashes, and a record whose hashed fields
are intact is the record that was chained.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from struct import Struct
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from streams.avro_fast import AvroDecodeError, compile_reader
from streams.avro_write import NotCompilable
from streams.clients import Consumer
from streams.schemas import EventSchema, load_all

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
BATCH = 10_000

__all__ = [
    "AvroDecodeError",
    "NotCompilable",
    "RawBatch",
    "RecordReaders",
    "compile_extractor",
    "scan_raw",
    "scan_to_end",
]


def scan_to_end(
    bootstrap: str,
    topics: Collection[str],
    timeout: float,
    *,
    partitions: Collection[int] | None = None,
    keys: Collection[bytes] | None = None,
    start: Mapping[int, int] | None = None,
    ends_seen: dict[tuple[str, int], int] | None = None,
) -> Iterator[Message]:
    """Every committed record of `topics` (read_committed), from the start to the end offsets
    seen now, partition by partition in offset order; with `keys`, only records with one of them.
    `start` (partition -> offset) reads only from there on (a tail); `ends_seen`, if given, is
    filled with the end offset taken as the end of each (topic, partition), read or empty.

    Raises TimeoutError when the end is not reached within `timeout` seconds (callers rebuild
    or verify state from the result and must not take a prefix for the whole).
    """
    consumer = reader_consumer(bootstrap, eof=True)
    try:
        ends = assign_from_start(consumer, topics, timeout, partitions, start, ends_seen)
        if not ends:
            return
        wanted = None if keys is None else frozenset(keys)
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(pending)} to their end within {timeout} s")
            batch = consumer.consume(BATCH, 0.5)
            for msg in batch:
                err = msg.error()
                if err is None:
                    if wanted is None or msg.key() in wanted:
                        yield msg
                elif err.code() == KafkaError._PARTITION_EOF:
                    tp = (msg.topic() or "", msg.partition() or 0)
                    if (msg.offset() or 0) >= ends.get(tp, 0):
                        pending.discard(tp)
            if pending and len(batch) < BATCH:  # the end offset may be a transaction marker: no EOF past it
                for pos in consumer.position([TopicPartition(t, p) for t, p in pending]):
                    if pos.offset >= ends[(pos.topic or "", pos.partition)]:
                        pending.discard((pos.topic or "", pos.partition))
    finally:
        consumer.close()


@dataclass(slots=True)
class RawBatch:
    """One consume call's records of one topic: their values, in the order read (each
    partition's in offset order)."""

    topic: str
    values: list[bytes]


def scan_raw(
    bootstrap: str, topics: Collection[str], timeout: float, *, partitions: Collection[int] | None = None
) -> Iterator[RawBatch]:
    """`scan_to_end` for readers that hand the bytes on in bulk (`audit verify` into ClickHouse):
    per record only its value is taken, in a list comprehension (about 50 ns a record against
    the ~2 µs consume itself costs), no Message is kept, and each topic is read by a consumer
    of its own (so no per-record topic lookup). Tombstones (a None value) and error events are
    left out. Raises TimeoutError like `scan_to_end`.
    """
    for topic in topics:
        yield from _scan_topic_raw(bootstrap, topic, timeout, partitions)


def _scan_topic_raw(
    bootstrap: str, topic: str, timeout: float, partitions: Collection[int] | None
) -> Iterator[RawBatch]:
    consumer = reader_consumer(bootstrap, eof=False)
    try:
        ends = assign_from_start(consumer, [topic], timeout, partitions, None, None)
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(pending)} to their end within {timeout} s")
            batch = consumer.consume(BATCH, 0.05)  # short: the last, partial batch must not wait long
            full = len(batch) == BATCH
            if batch:
                values = [m.value() for m in batch]
                if None in values or any([m.error() for m in batch]):
                    values = [m.value() for m in batch if m.error() is None and m.value() is not None]
                if values:  # a batch of only tombstones or errors makes no file (its count would be 0)
                    yield RawBatch(topic, values)  # type: ignore[arg-type]  # no None left
            if not full:  # no EOF events here: the end is where the position reaches the end offset
                for pos in consumer.position([TopicPartition(t, p) for t, p in pending]):
                    if pos.offset >= ends[(pos.topic or "", pos.partition)]:
                        pending.discard((pos.topic or "", pos.partition))
    finally:
        consumer.close()


# librdkafka settings of a reader to the end, not a tailer (log scans, `audit verify`, replay):
# everything is there, so ask again at once rather than wait for more data (the 500 ms default
# stalls every small last fetch), and prefetch deep (the reader, not the network, is the bottleneck)
READER_FETCH: dict[str, object] = {
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 16 * 1024 * 1024,
    "fetch.wait.max.ms": 10,
    "queued.min.messages": 1_000_000,
    "queued.max.messages.kbytes": 256 * 1024,
}


def reader_consumer(bootstrap: str, eof: bool, name: str = "scan") -> Consumer:
    """A consumer that reads committed records to the end under a throwaway group id (it never
    joins: callers assign, see `assign_from_start`) and commits nothing."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-{name}-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": eof,
            **READER_FETCH,
        }
    )


def assign_from_start(
    consumer: Consumer,
    topics: Collection[str],
    timeout: float,
    partitions: Collection[int] | None,
    start: Mapping[int, int] | None,
    ends_seen: dict[tuple[str, int], int] | None,
) -> dict[tuple[str, int], int]:
    """Assign every non-empty (topic, partition) asked for from its start; → their end offsets."""
    md = consumer.list_topics(timeout=timeout)
    ends: dict[tuple[str, int], int] = {}
    assign = []
    for topic in topics:
        if topic not in md.topics:
            continue
        for p in md.topics[topic].partitions:
            if partitions is not None and p not in partitions:
                continue
            low, high = _watermarks(consumer, TopicPartition(topic, p), timeout)
            if ends_seen is not None:
                ends_seen[(topic, p)] = high
            if start is not None and p in start:
                low = max(low, start[p])
            if high > low:
                ends[(topic, p)] = high
                assign.append(TopicPartition(topic, p, low))
    if assign:
        consumer.assign(assign)
    return ends


_NO_LEADER_YET = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE})


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """The partition's (low, high) offsets, waiting out a leader election (a topic just created)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            return low, high
        except KafkaException as exc:
            if exc.args[0].code() not in _NO_LEADER_YET or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Raw varint at `pos` → (value, position after it); at most 10 bytes, below 2**64."""
    b = data[pos]
    n = b & 0x7F
    shift = 7
    pos += 1
    while b & 0x80:
        if shift > 63:
            raise AvroDecodeError("varint longer than 10 bytes")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    if n >> 64:
        raise AvroDecodeError("varint above 64 bits")
    return n, pos


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# a length prefix's first byte → 1 + the length when that byte is the whole varint of a
# non-negative length (< 64), else 0 (a longer varint, or odd: a negative length)
_SPAN1: tuple[int, ...] = tuple(1 + (b >> 1) if b < 0x80 and not b & 1 else 0 for b in range(256))
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


class _Extract:
    def __init__(self, wanted: Sequence[str]) -> None:
        self.wanted = {path: i for i, path in enumerate(wanted)}
        self.found: set[str] = set()
        self.lines: list[str] = []
        self.n = 0

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def var(self) -> str:
        self.n += 1
        return f"x{self.n}"

    def varint(self, indent: int, target: str) -> None:
        """`target` = the raw varint at pos; one- and two-byte ones inline."""
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "if b < 0x80:")
        self.emit(indent + 1, f"{target} = b")
        self.emit(indent + 1, "pos += 1")
        self.emit(indent, "elif data[pos + 1] < 0x80:")
        self.emit(indent + 1, f"{target} = (b & 0x7F) | (data[pos + 1] << 7)")
        self.emit(indent + 1, "pos += 2")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{target}, pos = _uv(data, pos)")

    def field(self, schema: Any, path: str, indent: int) -> None:
        """Read (if wanted) or skip one value of `schema` at pos."""
        slot = self.wanted.get(path)
        target = f"w{slot}" if slot is not None else None
        if target is not None:
            self.found.add(path)
        if isinstance(schema, list):
            if target is not None and any(b != "null" and not self.simple(b) for b in schema):
                raise NotCompilable(f"{path}: only unions of primitives can be taken")
            u = self.var()
            self.varint(indent, u)
            for i, branch in enumerate(schema):
                self.emit(indent, f"{'if' if i == 0 else 'elif'} {u} == {2 * i}:")
                self.field(branch, path, indent + 1)
            self.emit(indent, "else:")
            self.emit(indent + 1, "raise _E('union index out of range')")
            return
        if isinstance(schema, dict):
            t = schema["type"]
            logical = schema.get("logicalType")
            if t in ("record", "error"):
                if target is not None:
                    raise NotCompilable(f"{path}: take the record's fields, not the record")
                for f in schema["fields"]:
                    self.field(f["type"], f"{path}.{f['name']}" if path else f["name"], indent)
                return
            if t == "map" and self.simple(schema["values"]):
                self.map(schema["values"], target, indent)
                return
            if logical == "timestamp-micros" and t == "long":
                n = self.var()
                self.varint(indent, n)
                if target is not None:
                    self.emit(indent, f"{target} = _EPOCH + _td(microseconds=({n} >> 1) ^ -({n} & 1))")
                return
            if logical is not None or not isinstance(t, str) or t not in _PRIMITIVES:
                raise NotCompilable(f"{path}: {t}/{logical}")
            schema = t
        if not isinstance(schema, str) or schema not in _PRIMITIVES:
            raise NotCompilable(f"{path}: {schema!r}")
        self.primitive(schema, target, indent)

    @staticmethod
    def simple(schema: Any) -> bool:
        return isinstance(schema, str) and schema in ("string", "long", "int", "boolean")

    def primitive(self, t: str, target: str | None, indent: int) -> None:
        if t == "null":
            self.emit(indent, "pass" if target is None else f"{target} = None")
        elif t == "boolean":
            if target is not None:
                self.emit(indent, f"{target} = _BOOL[data[pos]]")
            else:
                self.emit(indent, "_BOOL[data[pos]]")
            self.emit(indent, "pos += 1")
        elif t in ("int", "long"):
            n = self.var()
            self.emit(indent, "b = data[pos]")
            self.emit(indent, "if b < 0x80:")
            if target is not None:
                self.emit(indent + 1, f"{target} = (b >> 1) ^ -(b & 1)")
            self.emit(indent + 1, "pos += 1")
            self.emit(indent, "else:")
            self.emit(indent + 1, f"{n}, pos = _uv(data, pos)")
            if target is not None:
                self.emit(indent + 1, f"{target} = ({n} >> 1) ^ -({n} & 1)")
        elif t in ("float", "double"):
            size = 4 if t == "float" else 8
            if target is not None:
                self.emit(indent, f"{target} = _{t}(data, pos)[0]")
            self.emit(indent, f"pos += {size}")
        else:  # string, bytes: a one-byte length (< 64) through a table, longer ones by the varint
            n = self.var()
            value = (f"data[pos + 1:{n}]" + (".decode()" if t == "string" else "")) if target else None
            self.emit(indent, f"{n} = _SPAN[data[pos]]")
            self.emit(indent, f"if {n}:")
            self.emit(indent + 1, f"{n} += pos")
            if target is not None:
                self.emit(indent + 1, f"{target} = {value}")
            self.emit(indent + 1, f"pos = {n}")
            self.emit(indent, "else:")
            self.varint(indent + 1, n)
            self.emit(indent + 1, f"if {n} & 1:")
            self.emit(indent + 2, "raise _E('negative length')")
            self.emit(indent + 1, f"end = pos + ({n} >> 1)")
            if target is not None:
                self.emit(indent + 1, f"{target} = data[pos:end]" + (".decode()" if t == "string" else ""))
            self.emit(indent + 1, "pos = end")

    def map(self, values: str, target: str | None, indent: int) -> None:
        d, c, k = self.var(), self.var(), self.var()
        if target is not None:
            self.emit(indent, f"{d} = {target} = {{}}")
        self.emit(indent, "while True:")
        self.varint(indent + 1, c)
        self.emit(indent + 1, f"{c} = ({c} >> 1) ^ -({c} & 1)")
        self.emit(indent + 1, f"if {c} == 0:")
        self.emit(indent + 2, "break")
        self.emit(indent + 1, f"if {c} < 0:")  # a block with its byte size: skip the size
        self.emit(indent + 2, f"{c} = -{c}")
        self.varint(indent + 2, "_")
        self.emit(indent + 1, f"if {c} > len(data) - pos:")
        self.emit(indent + 2, "raise _E('block count exceeds the bytes left')")
        self.emit(indent + 1, f"for _ in range({c}):")
        self.primitive("string", k if target is not None else None, indent + 2)
        v = self.var()
        self.primitive(values, v if target is not None else None, indent + 2)
        if target is not None:
            self.emit(indent + 2, f"{d}[{k}] = {v}")


def compile_extractor(schema: Any, wanted: Sequence[str]) -> Callable[[bytes, int], tuple[Any, ...]]:
    """`read(data, pos)` → the values of the `wanted` fields (dotted paths) of the record
    `schema` (fastavro-parsed) in `data[pos:]`, in that order; the datum must end at `len(data)`.

    Raises NotCompilable for a path that is not a field or a field kind it does not take
    (only primitives, unions of primitives, maps of primitives, timestamp-micros), and the
    read raises AvroDecodeError for a body that is not valid Avro of the schema.
    """
    ex = _Extract(wanted)
    ex.field(schema, "", 2)
    missing = set(wanted) - ex.found
    if missing:
        raise NotCompilable(f"no such fields: {sorted(missing)}")
    body = "\n".join(ex.lines)
    src = (
        "def read(data, pos, _uv=_uv, _E=_E, _EPOCH=_EPOCH, _td=_td, _BOOL=_BOOL, _float=_float, _double=_double,"
        " _SPAN=_SPAN):\n"
        f"    {' = '.join(f'w{i}' for i in range(len(wanted)))} = None\n"
        "    try:\n"
        f"{body}\n"
        "    except (IndexError, UnicodeDecodeError, OverflowError, ValueError) as exc:\n"
        "        raise _E(f'{type(exc).__name__}: {exc}') from None\n"
        "    if pos != len(data):\n"
        "        raise _E(f'datum ends at byte {pos}, input has {len(data)}')\n"
        f"    return ({''.join(f'w{i}, ' for i in range(len(wanted)))})\n"
    )
    namespace: dict[str, Any] = {
        "_uv": _uvarint, "_E": AvroDecodeError, "_EPOCH": _EPOCH, "_td": timedelta,
        "_BOOL": (False, True), "_float": Struct("<f").unpack_from, "_double": Struct("<d").unpack_from,
        "_SPAN": _SPAN1,
    }  # fmt: skip
    exec(compile(src, f"<avro extractor {schema.get('name', '?')}>", "exec"), namespace)  # our own generated code
    read: Callable[[bytes, int], tuple[Any, ...]] = namespace["read"]
    read.__avro_source__ = src  # type: ignore[attr-defined]
    return read


class RecordReaders:
    """Readers of today's schema of some event types, by single-object header (module docstring).

    Per event type, either dotted field paths (a `compile_extractor` tuple of those fields) or
    None: the whole record as a dict in Avro field layout (`streams.avro_fast.compile_reader`
    without building the event), for readers that need every field anyway.
    """

    def __init__(
        self, wanted: Mapping[str, Sequence[str] | None], schemas: dict[str, EventSchema] | None = None
    ) -> None:
        by_name = schemas if schemas is not None else load_all()
        self._readers: dict[bytes, tuple[str, Callable[[bytes, int], Any]]] = {}
        for name, paths in wanted.items():
            schema = by_name[name]
            read = compile_reader(schema.parsed) if paths is None else compile_extractor(schema.parsed, paths)
            self._readers[MAGIC + schema.fingerprint] = (name, read)

    def read(self, data: bytes | None) -> tuple[str, Any] | None:
        """(event type, the tuple or dict) if `data` is one of those events in today's schema, else None.

        Raises AvroDecodeError for a body that does not decode.
        """
        if type(data) is not bytes:
            return None
        entry = self._readers.get(data[:HEADER_LEN])
        if entry is None:
            return None
        name, read = entry
        return name, read(data, HEADER_LEN)
