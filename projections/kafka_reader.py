"""Replay's Kafka reader: records handed over as runs by a C extension instead of Message objects.

Why (issue 10, replay >= 250k events/s): with confluent-kafka, the driver thread spent ~2 µs of
GIL-holding CPU per record building and taking apart Message objects, on the two cores the
inserter also needs. `projections/_kafka_reader.c` reads with librdkafka itself and returns
*runs*: consecutive records of one partition whose values share the 10-byte single-object header,
as `(topic, partition, header, offsets, keys, values)`; the Sink takes a run with one Python step
(`Sink._take_runs`). Anything else (a tombstone, a value shorter than a header, an error event
such as a partition's EOF) comes as one `OddRecord`, which answers the `Message` methods the Sink's
record-by-record intake uses.

The extension is not linked against librdkafka: it loads the very library confluent-kafka loaded
(`library_path`), so both speak the same librdkafka. It is used only by replay (a consumer with no
group: assign, pause, resume, seek, position, watermarks; no commits, no rebalances); the live sink
stays on confluent-kafka. `available()` is False when the extension is not built, the library is
not found, or `LEDGERFLOW_NATIVE=0`: then replay uses confluent-kafka's Consumer, the reference.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.codec import HEADER_LEN

try:
    from projections import _kafka_reader
except ImportError:  # not built: replay reads through confluent-kafka
    _kafka_reader = None  # type: ignore[assignment]

NATIVE_ENV = "LEDGERFLOW_NATIVE"
PATH_ENV = "LEDGERFLOW_RDKAFKA"  # overrides where librdkafka is looked for (tests: a missing library)
_LOG = logging.getLogger("librdkafka")
_NOT_PASSED = frozenset({"logger", "error_cb", "stats_cb", "throttle_cb", "on_commit"})  # Python-side options
# librdkafka's syslog levels → logging's (as confluent-kafka maps them)
_LEVELS = (logging.CRITICAL,) * 3 + (logging.ERROR, logging.WARNING, logging.INFO, logging.INFO, logging.DEBUG)

Run = tuple[str, int, bytes, list[int], list[bytes | None], list[bytes]]
"""(topic, partition, header, offsets, keys, values): consecutive records of one partition, each
value ≥ 10 bytes and starting with `header`, offsets ascending."""


@cache
def _found_library() -> str | None:
    """The librdkafka confluent-kafka loaded (its wheel bundles one), else the system's."""
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                path = fields[5] if len(fields) >= 6 else ""  # address perms offset dev inode path
                if "librdkafka" in os.path.basename(path) and os.path.exists(path):
                    return path
    here = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
    bundled = sorted(glob.glob(os.path.join(here, "confluent_kafka.libs", "librdkafka*.so*")))
    if bundled:
        return bundled[0]
    return ctypes.util.find_library("rdkafka")


def library_path() -> str | None:
    """Where librdkafka is (`LEDGERFLOW_RDKAFKA` when set), or None."""
    override = os.environ.get(PATH_ENV, "").strip()
    if override:
        return override if os.path.exists(override) else None
    return _found_library()


def available() -> bool:
    """The reader can be used: built, librdkafka found, and not turned off (`LEDGERFLOW_NATIVE=0`)."""
    return _kafka_reader is not None and os.environ.get(NATIVE_ENV, "1").strip() != "0" and library_path() is not None


def _log_line(level: int, facility: str, message: str) -> None:
    _LOG.log(_LEVELS[level] if 0 <= level < len(_LEVELS) else logging.DEBUG, "%s: %s", facility, message)


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class OddRecord:
    """A record that is not part of a run (tombstone, short value) or an error event, with the
    `Message` accessors the Sink's record-by-record intake uses."""

    __slots__ = ("_error", "_key", "_offset", "_partition", "_topic", "_value")

    def __init__(
        self,
        topic: str | None,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: KafkaError | None = None,
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._error = key, value, error

    @classmethod
    def of(cls, item: tuple[Any, ...]) -> OddRecord:
        """From the reader's odd item `(topic, partition, offset, key, value)` or error item
        `(code, fatal, message, topic, partition, offset)`."""
        if len(item) == 5:
            return cls(*item)
        code, fatal, message, topic, partition, offset = item
        return cls(topic, partition, offset, None, None, KafkaError(code, message, fatal=fatal))

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int | None:
        return self._partition

    def offset(self) -> int | None:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def __repr__(self) -> str:
        return f"OddRecord({self._topic}[{self._partition}]@{self._offset}, error={self._error})"


def odd_records(
    topic: str, partition: int, offsets: Sequence[int], keys: Sequence[bytes | None], values: Sequence[bytes | None]
) -> list[OddRecord]:
    """Records of a run as OddRecords (for the record-by-record intake)."""
    return [OddRecord(topic, partition, o, k, v) for o, k, v in zip(offsets, keys, values, strict=True)]


def items_of(messages: Sequence[confluent_kafka.Message]) -> list[tuple[Any, ...]]:
    """The reader's items for confluent-kafka Messages, in Python: what `_kafka_reader.read` builds
    from the same records (the reference the tests hold the C grouping and the Sink's run intake to)."""
    out: list[tuple[Any, ...]] = []
    run: list[Any] | None = None
    for m in messages:
        err, topic, partition, offset, value = m.error(), m.topic(), m.partition(), m.offset(), m.value()
        assert partition is not None and offset is not None
        if err is None and value is not None and len(value) >= HEADER_LEN:
            header = value[:HEADER_LEN]
            if run is not None and run[:3] == [topic, partition, header] and offset > run[3][-1]:
                run[3].append(offset)
                run[4].append(m.key())
                run[5].append(value)
                continue
            run = [topic, partition, header, [offset], [m.key()], [value]]
            out.append(run)  # type: ignore[arg-type]  # a list while it grows, a tuple below
            continue
        run = None
        if err is None:
            out.append((topic, partition, offset, m.key(), value))
        else:
            fatal = err.fatal() or err.code() == KafkaError._FATAL
            out.append((err.code(), fatal, err.str(), topic, partition, offset))
    return [tuple(i) for i in out]


class RunConsumer:
    """A consumer with no group that reads runs (see module doc): the subset of
    `confluent_kafka.Consumer` that the Sink (with `assign`, `commit=False`) and replay use."""

    def __init__(self, conf: Mapping[str, Any], lib_path: str | None = None) -> None:
        if _kafka_reader is None:
            raise RuntimeError("projections._kafka_reader is not built")
        path = lib_path or library_path()
        if path is None:
            raise RuntimeError("librdkafka not found")
        config = {k: _conf_value(v) for k, v in conf.items() if k not in _NOT_PASSED}
        try:
            self._reader = _kafka_reader.Reader(path, config, _log_line)
        except (RuntimeError, ValueError) as exc:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, str(exc))) from exc

    def read_runs(self, max_messages: int, timeout: float) -> list[tuple[Any, ...]]:
        """Up to `max_messages` records as runs and odd items, in delivery order (see the C module)."""
        return self._call(self._reader.read, max_messages, max(timeout, 0.0))  # type: ignore[no-any-return]

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._call(self._reader.assign, [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._call(self._reader.pause, [(tp.topic, tp.partition) for tp in partitions])

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._call(self._reader.resume, [(tp.topic, tp.partition) for tp in partitions])

    def seek(self, tp: TopicPartition) -> None:
        self._call(self._reader.seek, tp.topic, tp.partition, tp.offset)

    def position(self, partitions: Sequence[TopicPartition]) -> list[TopicPartition]:
        offsets = self._call(self._reader.position, [(tp.topic, tp.partition) for tp in partitions])
        return [TopicPartition(tp.topic, tp.partition, o) for tp, o in zip(partitions, offsets, strict=True)]

    def committed(self, partitions: Sequence[TopicPartition], timeout: float = 10.0) -> list[TopicPartition]:
        offsets = self._call(self._reader.committed, [(tp.topic, tp.partition) for tp in partitions], timeout)
        return [TopicPartition(tp.topic, tp.partition, o) for tp, o in zip(partitions, offsets, strict=True)]

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = 10.0, cached: bool = False
    ) -> tuple[int, int]:
        """(low, high) asked of the broker (`cached` is not supported: always asked)."""
        low, high = self._call(self._reader.watermarks, partition.topic, partition.partition, timeout)
        return int(low), int(high)

    def partitions_of(self, topic_names: Sequence[str], timeout: float = 10.0) -> dict[str, list[int]]:
        """Partition ids of each of `topic_names` that exists (one metadata request)."""
        topics = self._call(self._reader.topics, timeout)
        return {name: sorted(topics[name]) for name in topic_names if name in topics}

    def close(self) -> None:
        self._reader.close()

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as exc:  # librdkafka's error, as confluent-kafka would raise it
            raise KafkaException(KafkaError(KafkaError._FAIL, str(exc))) from exc
