"""Local single-node Kafka broker: ``from infra.kafka import KafkaConfig, start, stop``.

Names are re-exported lazily so ``python -m infra.kafka.runner`` does not import the
runner twice (runpy warns when the package already imported the module it executes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.kafka.runner import (
        DEFAULT_CACHE,
        DEFAULT_HOME,
        DEFAULT_POM,
        READY_TOPIC,
        KafkaConfig,
        KafkaError,
        ensure_jars,
        is_running,
        log_path,
        main,
        start,
        stop,
    )

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_HOME",
    "DEFAULT_POM",
    "READY_TOPIC",
    "KafkaConfig",
    "KafkaError",
    "ensure_jars",
    "is_running",
    "log_path",
    "main",
    "start",
    "stop",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("infra.kafka.runner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
