"""confluent-kafka's clients, with librdkafka's own log lines sent through Python logging.

Why: librdkafka writes its lines (`%3|1795…|FAIL|rdkafka#consumer-1| …`) straight to stderr,
beside our JSON log lines, where no log shipper can parse them and no scrubber sees them. Given
a `logger`, it hands them to Python instead: records of the `librdkafka` logger, formatted like
every other line (`streams.telemetry`). They are delivered from the client's own poll, consume
and flush calls, which every client here makes anyway. Import these instead of
`confluent_kafka`'s; they are subclasses, so type hints and isinstance checks do not change.
Not the AdminClient: nothing polls it, so its lines would queue unread instead of reaching stderr.
"""

from __future__ import annotations

import logging
from typing import Any

import confluent_kafka

LOGGER_NAME = "librdkafka"
_LOG = logging.getLogger(LOGGER_NAME)


def _logged(conf: dict[str, Any]) -> dict[str, Any]:
    return conf if "logger" in conf else {**conf, "logger": _LOG}


class Producer(confluent_kafka.Producer):
    def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(_logged(conf), **kwargs)


class Consumer(confluent_kafka.Consumer):
    def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(_logged(conf), **kwargs)
