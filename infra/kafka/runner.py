"""Run a single-node Apache Kafka (KRaft) broker from Maven-fetched jars, without Docker.

Development and tests need a real broker (transactions, compaction, consumer groups),
but the machines we run on have Java and Maven, not Docker.  This module fetches the
pinned broker jars once (``infra/kafka/pom.xml``), writes a combined broker+controller
config into a per-broker *home* directory, formats KRaft storage once and launches the
broker detached, so it outlives the Python process that started it.

``start`` only returns once a real produce has been acknowledged, so callers never race
a half-started broker; ``stop`` is SIGTERM with a SIGKILL fallback.

CLI: ``python -m infra.kafka start|stop|status [--home H] [--cache C] [--port P]
[--controller-port Q]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, NewTopic

from infra.process import alive, children, cmdline, home_lock, port_open, read_pid, write_pid

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

REPO = Path(__file__).resolve().parents[2]
DEFAULT_POM = REPO / "infra" / "kafka" / "pom.xml"
DEFAULT_HOME = REPO / ".ledgerflow" / "kafka"
DEFAULT_CACHE = REPO / ".cache" / "kafka"
LOG4J_CONFIG = Path(__file__).resolve().with_name("log4j2.xml")

#: Topic the readiness probe produces to; created with one partition on first start.
READY_TOPIC = "__ledgerflow_ready"

_MIN_JAVA = 17
_KAFKA_JAR_GLOB = "kafka_2.13-*.jar"
_MAIN_CLASS = "kafka.Kafka"
_TAIL_LINES = 20

# Brokers launched by this interpreter, kept so we can reap them (no zombies that
# still look alive to kill(pid, 0)) and so Popen never warns about a live child.

# librdkafka logs every refused connection while the broker boots; that is expected
# noise during the readiness probe, so its client logs go nowhere.
_quiet = logging.getLogger("ledgerflow.infra.kafka.probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class KafkaConfig:
    """Where one local broker lives and listens; one home directory == one broker."""

    home: Path
    cache: Path
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap_mb: int = 512

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value clients should use."""
        return f"{self.host}:{self.port}"


class KafkaError(RuntimeError):
    """A local broker could not be provisioned, started or stopped.

    The message always says what to do next, because the reader is usually a
    developer looking at a failed test run, not at this code.
    """


# --------------------------------------------------------------------------- paths


def _absolute(cfg: KafkaConfig) -> KafkaConfig:
    """Absolute home/cache: the JVM runs with cwd=home, and the pid check compares argv."""
    return replace(cfg, home=cfg.home.resolve(), cache=cfg.cache.resolve())


def log_path(cfg: KafkaConfig) -> Path:
    """The broker's main log (INFO and up), written by ``log4j2.xml``."""
    return _logs_dir(_absolute(cfg)) / "server.log"


def _logs_dir(cfg: KafkaConfig) -> Path:
    return cfg.home / "logs"


def _data_dir(cfg: KafkaConfig) -> Path:
    return cfg.home / "data"


def _out_path(cfg: KafkaConfig) -> Path:
    """Captured stdout/stderr: WARN+ log lines plus anything the JVM itself prints."""
    return _logs_dir(cfg) / "server.out"


def _pid_path(cfg: KafkaConfig) -> Path:
    return cfg.home / "kafka.pid"


def _props_path(cfg: KafkaConfig) -> Path:
    return cfg.home / "server.properties"


# ------------------------------------------------------------------ prerequisites


def _java_major(java: str) -> int | None:
    """Major version of ``java``, or None if it cannot be determined."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_292" style
        major = int(match.group(2))
    return major


def _require_java() -> str:
    """Path to a Java >= 17 executable; Kafka 4 refuses to run on anything older."""
    java = shutil.which("java")
    if java is None:
        raise KafkaError(
            f"Java {_MIN_JAVA}+ not found on PATH: install openjdk-{_MIN_JAVA}-jre-headless "
            "(or put a JDK's bin/ on PATH)"
        )
    major = _java_major(java)
    if major is None or major < _MIN_JAVA:
        found = "an unknown version" if major is None else f"Java {major}"
        raise KafkaError(
            f"{java} is {found} but Kafka 4 needs Java {_MIN_JAVA}+: "
            f"install openjdk-{_MIN_JAVA}-jre-headless and put it first on PATH"
        )
    return java


def _has_kafka_jar(libs: Path) -> bool:
    return libs.is_dir() and any(libs.glob(_KAFKA_JAR_GLOB))


def ensure_jars(cache: Path, pom: Path = DEFAULT_POM) -> Path:
    """Return ``cache/"libs"`` holding the broker's classpath, fetching it with Maven if absent.

    Maven downloads into a temporary sibling directory that is renamed into place only
    after success, so an interrupted download never looks like a complete classpath.
    """
    libs = cache / "libs"
    if _has_kafka_jar(libs):
        return libs

    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError(
            f"Kafka jars are not in {libs} and Maven (mvn) is not on PATH to fetch them: "
            f"install maven (apt-get install maven), or copy the jars there with "
            f"`mvn -q -B -f {pom} dependency:copy-dependencies -DincludeScope=runtime "
            f"-DoutputDirectory={libs}`"
        )
    _require_java()
    if not pom.is_file():
        raise KafkaError(f"{pom} not found: ensure_jars needs the pom naming the broker jars")

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=cache))
    try:
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",  # plain text for the error message we may build
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise KafkaError(f"could not run {mvn}: {exc}; check the Maven install") from exc
        if proc.returncode != 0 or not _has_kafka_jar(tmp):
            tail = _tail_text(proc.stdout + proc.stderr)
            raise KafkaError(
                f"Maven failed to fetch the Kafka jars (exit {proc.returncode}); check network "
                f"access to Maven Central or ~/.m2/settings.xml, then retry.\n"
                f"command: {' '.join(cmd)}\n{tail}"
            )
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the classpath is not a secret
        if libs.exists() and not _has_kafka_jar(libs):
            # Leftovers from an older layout or a manual copy gone wrong.
            shutil.rmtree(libs)
        try:
            tmp.rename(libs)
        except OSError:
            # A concurrent caller may have won the rename; fine if it left a classpath.
            if not _has_kafka_jar(libs):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


# ------------------------------------------------------------------- process state


def _read_pid(cfg: KafkaConfig) -> int | None:
    return read_pid(_pid_path(cfg))


def _write_pid(cfg: KafkaConfig, pid: int) -> None:
    write_pid(_pid_path(cfg), pid)


def _is_our_broker(cfg: KafkaConfig, pid: int) -> bool:
    """Guard against pid reuse: the process must be kafka.Kafka run on this home's config."""
    if not alive(pid):
        return False
    argv = cmdline(pid)
    if argv is None:
        return True  # no procfs: the pid file is all we have
    return _MAIN_CLASS.encode() in argv and str(_props_path(cfg)).encode() in argv


def _broker_pid(cfg: KafkaConfig) -> int | None:
    """Pid of this home's broker process if it is alive (ready or not)."""
    pid = _read_pid(cfg)
    if pid is not None and _is_our_broker(cfg, pid):
        return pid
    return None


def is_running(cfg: KafkaConfig) -> bool:
    """True if this home's broker process is alive and its client port accepts connections."""
    cfg = _absolute(cfg)
    return _broker_pid(cfg) is not None and port_open(cfg.host, cfg.port)


# ------------------------------------------------------------------ configuration


def _server_properties(cfg: KafkaConfig) -> str:
    """Single-node combined broker+controller with RF=1 everywhere internal topics need it."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Static quorum: formatting must then NOT use --standalone (that is for the
        # dynamic quorum configured via controller.quorum.bootstrap.servers).
        "controller.quorum.voters": f"1@{cfg.host}:{cfg.controller_port}",
        "listeners": f"PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{cfg.host}:{cfg.port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(_data_dir(cfg)),
        "num.partitions": "12",
        # One broker: internal topics (offsets, transactions, share state) cannot have RF 3.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Two cores: keep thread pools small.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "group.initial.rebalance.delay.ms": "0",
        # Kafka 4.0 keeps the previous incarnation's session alive across a restart of a
        # combined node, so re-registration waits out broker.session.timeout.ms (default
        # 9 s; KAFKA-19130, fixed after 4.0).  A short session makes restarts fast;
        # heartbeats are on loopback, so a false fence would need a multi-second stall.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "3000",
        # Topics are declared explicitly; a typo must fail, not create a topic.
        "auto.create.topics.enable": "false",
        # Facts are kept forever unless a topic says otherwise.
        "log.retention.hours": "-1",
    }
    lines = ["# Written by infra/kafka/runner.py on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def _new_cluster_id() -> str:
    """A Kafka-style Uuid: 22 chars of URL-safe base64, never starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _cluster_id(cfg: KafkaConfig) -> str:
    """The home's cluster id, generated on first use and kept so reformatting agrees."""
    path = cfg.home / "cluster.id"
    try:
        cid = path.read_text().strip()
    except OSError:
        cid = ""
    if not cid:
        cid = _new_cluster_id()
        path.write_text(cid + "\n")
    return cid


def _java_cmd(java: str, libs: Path, cfg: KafkaConfig, *, heap_mb: int) -> list[str]:
    return [
        java,
        f"-Xms{heap_mb}m",
        f"-Xmx{heap_mb}m",
        "-XX:+ExitOnOutOfMemoryError",  # a dead broker is easier to diagnose than a wedged one
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={_logs_dir(cfg)}",
        "-cp",
        str(libs / "*"),
    ]


def _format_storage(java: str, libs: Path, cfg: KafkaConfig) -> None:
    """Format KRaft metadata storage once; a formatted log dir is left untouched."""
    if (_data_dir(cfg) / "meta.properties").is_file():
        return
    cmd = [
        *_java_cmd(java, libs, cfg, heap_mb=128),
        "kafka.tools.StorageTool",
        "format",
        "--cluster-id",
        _cluster_id(cfg),
        "--config",
        str(_props_path(cfg)),
        "--ignore-formatted",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cfg.home)
    if proc.returncode != 0:
        raise KafkaError(
            f"formatting Kafka storage in {_data_dir(cfg)} failed (exit {proc.returncode}); "
            f"if the directory is from another cluster, stop the broker and delete "
            f"{cfg.home} to start fresh.\n{_tail_text(proc.stdout + proc.stderr)}"
        )


# ---------------------------------------------------------------------- readiness


def _tail_text(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _tail_file(path: Path, n: int = _TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail_text(fh.read().decode(errors="replace"), n)
    except OSError:
        return ""


def _diagnostics(cfg: KafkaConfig) -> str:
    out = _out_path(cfg)
    tail = _tail_file(out)
    if tail:
        return f"log: {log_path(cfg)}\nlast {_TAIL_LINES} lines of {out}:\n{tail}"
    tail = _tail_file(log_path(cfg))
    return f"log: {log_path(cfg)} ({out} is empty)\nlast {_TAIL_LINES} lines of the log:\n{tail}"


def _probe(cfg: KafkaConfig, timeout: float) -> str | None:
    """Produce one acknowledged record; None on success, else why not.

    An open port is not enough: the broker must have a controller, register itself
    and own partition leadership before clients can actually use it.
    """
    common: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap,
        "logger": _quiet,
        "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000)),
    }
    admin = AdminClient(dict(common))
    futures = admin.create_topics(
        [NewTopic(READY_TOPIC, num_partitions=1, replication_factor=1)],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    try:
        futures[READY_TOPIC].result(timeout=timeout + 1)
    except ck.KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not (isinstance(err, ck.KafkaError) and err.code() == ck.KafkaError.TOPIC_ALREADY_EXISTS):
            return f"create {READY_TOPIC}: {exc}"
    except Exception as exc:  # futures can surface transport failures as other types
        return f"create {READY_TOPIC}: {exc!r}"

    errors: list[str] = []
    delivered: list[bool] = []

    def on_delivery(err: ck.KafkaError | None, _msg: ck.Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append(True)

    producer = ck.Producer({**common, "acks": "all", "message.timeout.ms": max(1000, int(timeout * 1000))})
    producer.produce(READY_TOPIC, value=b"ready", on_delivery=on_delivery)
    producer.flush(timeout + 1)
    if delivered:
        return None
    return f"produce to {READY_TOPIC}: {errors[0] if errors else 'not acknowledged in time'}"


def _wait_ready(cfg: KafkaConfig, pid: int, deadline: float) -> None:
    """Block until the broker serves a produce, or raise with the log tail."""
    reason = "client port never opened"
    while True:
        if not alive(pid):
            child = children.get(pid)
            code = f" with code {child.returncode}" if child is not None else ""
            raise KafkaError(
                f"Kafka broker (pid {pid}) exited{code} during startup; read the log below, "
                f"fix the cause (port in use? stale data dir?) and start again.\n"
                f"{_diagnostics(cfg)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KafkaError(
                f"Kafka broker (pid {pid}) not ready on {cfg.bootstrap} before the timeout "
                f"({reason}); read the log below, or retry with a longer timeout.\n"
                f"{_diagnostics(cfg)}"
            )
        if not port_open(cfg.host, cfg.port):
            time.sleep(0.2)
            continue
        failure = _probe(cfg, timeout=max(1.0, min(10.0, remaining)))
        if failure is None:
            return
        reason = failure
        time.sleep(0.3)


# ------------------------------------------------------------------------ control


def start(cfg: KafkaConfig, timeout: float = 90.0) -> int:
    """Start this home's broker (or adopt the one already running) and return its pid.

    Returns only once a produce has been acknowledged.  On failure nothing launched by
    this call is left running and the KafkaError carries the log tail.
    """
    deadline = time.monotonic() + timeout
    cfg = _absolute(cfg)
    with home_lock(cfg.home):
        pid = _broker_pid(cfg)
        if pid is not None:
            # Ours, maybe still booting (another caller started it): wait, don't relaunch.
            _wait_ready(cfg, pid, deadline)
            return pid
        _pid_path(cfg).unlink(missing_ok=True)  # stale: process gone or pid reused

        for port in (cfg.port, cfg.controller_port):
            if port_open(cfg.host, port):
                raise KafkaError(
                    f"{cfg.host}:{port} is already in use by a process that is not the broker "
                    f"of {cfg.home}: stop it, or choose other ports (--port/--controller-port)"
                )

        java = _require_java()
        libs = ensure_jars(cfg.cache)
        _data_dir(cfg).mkdir(parents=True, exist_ok=True)
        _logs_dir(cfg).mkdir(parents=True, exist_ok=True)
        _props_path(cfg).write_text(_server_properties(cfg))
        _format_storage(java, libs, cfg)

        cmd = [*_java_cmd(java, libs, cfg, heap_mb=cfg.heap_mb), _MAIN_CLASS, str(_props_path(cfg))]
        with _out_path(cfg).open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=cfg.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survive our exit and our terminal's Ctrl-C
                close_fds=True,
            )
        children[proc.pid] = proc
        _write_pid(cfg, proc.pid)
        try:
            _wait_ready(cfg, proc.pid, deadline)
        except BaseException:
            with contextlib.suppress(KafkaError):
                _terminate(cfg, proc.pid, timeout=10.0)
            raise
        return proc.pid


def _terminate(cfg: KafkaConfig, pid: int, timeout: float) -> None:
    """SIGTERM (Kafka shuts down cleanly), SIGKILL if it is still there after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if not alive(pid):
            break
    if alive(pid):
        raise KafkaError(f"Kafka broker pid {pid} survived SIGKILL; check `ps -p {pid}`")
    children.pop(pid, None)
    _pid_path(cfg).unlink(missing_ok=True)


def stop(cfg: KafkaConfig, timeout: float = 30.0) -> bool:
    """Stop this home's broker; True if one was running.  Safe to call when stopped."""
    cfg = _absolute(cfg)
    if not cfg.home.is_dir():
        return False  # never started here; don't create the home just to look
    with home_lock(cfg.home):
        pid = _broker_pid(cfg)
        if pid is None:
            _pid_path(cfg).unlink(missing_ok=True)
            return False
        _terminate(cfg, pid, timeout)
        return True


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``fetch`` / ``start`` / ``stop`` / ``status`` for a local broker; exit 0 on success (status: running)."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.kafka",
        description="Run a local single-node Kafka broker for ledgerflow development.",
    )
    parser.add_argument("command", choices=["fetch", "start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="broker working dir")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="jar cache dir")
    parser.add_argument("--port", type=int, default=9092, help="client listener port")
    parser.add_argument("--controller-port", type=int, default=9093, help="KRaft controller port")
    args = parser.parse_args(argv)

    cfg = KafkaConfig(
        home=args.home.resolve(),
        cache=args.cache.resolve(),
        port=args.port,
        controller_port=args.controller_port,
    )
    try:
        if args.command == "fetch":
            libs = ensure_jars(cfg.cache)
            print(f"kafka jars in {libs} ({len(list(libs.glob('*.jar')))} jars)")
            return 0
        if args.command == "start":
            began = time.monotonic()
            pid = start(cfg)
            took = time.monotonic() - began
            print(f"kafka ready on {cfg.bootstrap} (pid {pid}, {took:.1f}s)")
            print(f"log: {log_path(cfg)}")
            return 0
        if args.command == "stop":
            old_pid = _read_pid(cfg)
            if stop(cfg):
                print(f"kafka stopped (pid {old_pid}); log: {log_path(cfg)}")
            else:
                print(f"kafka was not running (home {cfg.home})")
            return 0
        if is_running(cfg):
            print(f"kafka running on {cfg.bootstrap} (pid {_read_pid(cfg)})")
            print(f"log: {log_path(cfg)}")
            return 0
        print(f"kafka not running (home {cfg.home}); log: {log_path(cfg)}")
        return 1
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
