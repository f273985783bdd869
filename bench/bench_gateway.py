"""Gateway vs LiteLLM proxy, side by side on one machine, the same mock upstream and the same load.

Run:  .venv/bin/python bench/bench_gateway.py [--seconds 30] [--warmup 5] [--connections 32]
          [--threads 2] [--order gateway,litellm,gateway] [--tokens 16] [--profile py-spy]
      .venv/bin/python bench/bench_gateway.py --soak-minutes 30     # gateway only, RSS every 30 s

On demand only (never part of the test suite). Everything listens on 127.0.0.1 and is started
here, in this order, and stopped again on exit (also on Ctrl-C / SIGTERM / an error):

1. a real Kafka broker (`infra.kafka.runner`, temp home, free ports) and the topics
   (`streams.admin.ensure_topics`, a unique prefix);
2. the mock OpenAI-compatible upstream (`bench/mock_upstream.py`, one process);
3. ONE gateway process (`python -m gateway`): API-key auth (demo key), the in-process rate
   limiter with limits far above the offered load (checked, never refusing), and the facts of
   every request produced to Kafka in one transaction before the answer; the upstream is the
   mock, model "gpt-4o-mini" priced 0.15/0.60 per 1M tokens;
4. the LiteLLM proxy (`litellm --config … --port …`, default single worker) from its own venv
   `bench/.venv-litellm` (`python -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip
   install 'litellm[proxy]'`), model "gpt-4o-mini" → `openai/gpt-4o-mini` at the mock, with a
   master key so it authenticates too. Skipped (gateway alone) if that venv is missing.

Load: `wrk` with `bench/wrk_chat.lua` (a small non-streamed chat completion; every response
is checked: non-2xx and 2xx without "choices" are counted). Each measured run follows its own
warm-up; targets are interleaved (default gateway, litellm, gateway) so machine noise is
shared. wrk runs on the same cores as the servers and the broker. CPU seconds of each process
during each run are reported (from /proc), and after the runs the committed facts in Kafka are
counted and compared with the gateway's 2xx answers.

`--profile py-spy` adds one more gateway run with py-spy attached (`--py-spy` names the
binary; e.g. `pip install --target /tmp/pyspy py-spy` → /tmp/pyspy/bin/py-spy) and prints
where the gateway's samples go. `--soak-minutes N` runs the gateway alone under steady load
for N minutes in `--soak-interval` (30 s) wrk segments and prints its RSS after each one.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from infra.kafka.runner import KafkaConfig  # noqa: E402
from infra.kafka.runner import start as kafka_start  # noqa: E402
from infra.kafka.runner import stop as kafka_stop  # noqa: E402
from ledgerflow.settings import DEMO_KEYS  # noqa: E402
from streams.admin import ensure_topics  # noqa: E402
from streams.topics import Topics  # noqa: E402

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
API_KEY = DEMO_KEYS["acme"]
LUA = REPO / "bench" / "wrk_chat.lua"
LITELLM_VENV = REPO / "bench" / ".venv-litellm"
CHAT_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Explain Kafka consumer groups in one sentence."}],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

_ports: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _ports:
            _ports.add(port)
            return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@dataclass
class Cleanup:
    """Everything this run started; `close` stops it all (idempotent)."""

    procs: list[Proc] = field(default_factory=list)
    kafka: KafkaConfig | None = None
    workdir: Path | None = None
    keep_workdir: bool = False
    closed: bool = False

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        assert self.workdir is not None
        log_path = self.workdir / f"{name}.log"
        out = log_path.open("wb")
        popen = subprocess.Popen(  # own process group, so the whole tree can be stopped by its id
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        log(f"started {name} (pid {popen.pid}): {' '.join(cmd)}")
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of its group
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
                log(f"stopped {proc.name} (pid {proc.pid})")
            except Exception as exc:
                log(f"could not stop {proc.name} (pid {proc.pid}): {exc}")
        if self.kafka is not None:
            try:
                kafka_stop(self.kafka)
                log("stopped kafka")
            except Exception as exc:
                log(f"could not stop kafka in {self.kafka.home}: {exc}")
        if self.workdir is not None:
            if self.keep_workdir:
                log(f"kept logs and config in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that cleans up


# --------------------------------------------------------------------------- HTTP helpers


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(what: str, proc: Proc, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name}: {what} not reached in {timeout:.0f} s:\n{proc.tail()}")


def chat_ok(url: str, key: str) -> tuple[int, bytes]:
    return http("POST", url + "/v1/chat/completions", CHAT_BODY, {"Authorization": f"Bearer {key}"})


# --------------------------------------------------------------------------- /proc sampling


def _proc_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        tree += kids
        frontier = kids
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process and its live descendants (all threads)."""
    total = 0
    for pid in _proc_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- wrk


@dataclass
class Run:
    target: str
    label: str
    result: dict[str, Any]
    cpu: dict[str, float]  # CPU seconds per process during the run
    seconds: float

    @property
    def rps(self) -> float:
        return float(self.result["requests"]) / (self.result["duration_us"] / 1e6)

    @property
    def failures(self) -> int:
        r = self.result
        return int(r["non2xx_hook"] + r["bad_body"] + r["connect_errors"] + r["read_errors"] + r["write_errors"]
                   + r["timeouts"])  # fmt: skip

    def ms(self, key: str) -> float:
        return float(self.result[key]) / 1000


def wrk(url: str, key: str, seconds: float, args: argparse.Namespace, watch: dict[str, int]) -> Run | None:
    """One wrk run; CPU seconds of each watched process (and of wrk itself) over it."""
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{int(seconds)}s", "--timeout", "10s",
           "--latency", "-s", str(LUA), url]  # fmt: skip
    env = {**os.environ, "BENCH_AUTH": f"Bearer {key}", "BENCH_MODEL": MODEL}
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    took = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
    cpu["wrk"] = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        log(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return None
    return Run("", "", json.loads(line.removeprefix("BENCH_JSON ")), cpu, took)


# --------------------------------------------------------------------------- the systems under test


@dataclass
class Target:
    name: str
    url: str
    key: str
    proc: Proc


def start_kafka(cleanup: Cleanup) -> str:
    assert cleanup.workdir is not None
    cfg = KafkaConfig(
        home=cleanup.workdir / "kafka", cache=REPO / ".cache" / "kafka", host=HOST, port=free_port(),
        controller_port=free_port(),
    )  # fmt: skip
    cfg.home.mkdir()
    cleanup.kafka = cfg
    began = time.monotonic()
    kafka_start(cfg)
    log(f"kafka ready on {cfg.bootstrap} in {time.monotonic() - began:.1f} s")
    return cfg.bootstrap


def kafka_pid(cleanup: Cleanup) -> int | None:
    assert cleanup.kafka is not None
    try:
        return int((cleanup.kafka.home.resolve() / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def start_mock(cleanup: Cleanup, tokens: int) -> tuple[Proc, str]:
    port = free_port()
    proc = cleanup.spawn("mock", [sys.executable, str(REPO / "bench" / "mock_upstream.py"), "--host", HOST,
                                  "--port", str(port), "--tokens", str(tokens)])  # fmt: skip
    url = f"http://{HOST}:{port}"
    wait_until("GET /v1/models", proc, lambda: http("GET", url + "/v1/models")[0] == 200, 30)
    return proc, url


def start_gateway(
    cleanup: Cleanup,
    bootstrap: str,
    topics: Topics,
    mock_url: str,
    args: argparse.Namespace,
    name: str = "gateway",
    extra_env: dict[str, str] | None = None,
) -> Target:
    assert cleanup.workdir is not None
    port = free_port()
    run = uuid.uuid4().hex[:8]
    upstreams = [{
        "name": "mock", "base_url": mock_url + "/v1", "allow_loopback": True,
        "models": [{"name": MODEL, "region": "local", "input_per_mtok": "0.15", "output_per_mtok": "0.60"}],
    }]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGERFLOW_")},
        "LEDGERFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
        "LEDGERFLOW_PARTITIONS": str(topics.partitions),
        "LEDGERFLOW_DATA_DIR": str(cleanup.workdir / "data"),
        "LEDGERFLOW_GATEWAY_HOST": HOST,
        "LEDGERFLOW_GATEWAY_PORT": str(port),
        "LEDGERFLOW_GATEWAY_INSTANCE_ID": f"bench-gw-{run}",
        "LEDGERFLOW_EGRESS_ALLOWED_HOSTS": json.dumps([HOST]),
        "LEDGERFLOW_UPSTREAMS": json.dumps(upstreams),
        "LEDGERFLOW_RATE_REQUESTS_PER_MIN": str(args.rate_requests_per_min),
        "LEDGERFLOW_RATE_TOKENS_PER_MIN": str(args.rate_tokens_per_min),
        **(extra_env or {}),
    }
    proc = cleanup.spawn(name, [sys.executable, "-m", "gateway"], env)
    url = f"http://{HOST}:{port}"
    wait_until("GET /readyz = 200", proc, lambda: http("GET", url + "/readyz")[0] == 200, 120)
    return Target(name, url, API_KEY, proc)


def litellm_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def start_litellm(cleanup: Cleanup, venv: Path, mock_url: str) -> Target:
    assert cleanup.workdir is not None
    port = free_port()
    master_key = f"sk-bench-{uuid.uuid4().hex[:12]}"
    general = f"general_settings:\n  master_key: {master_key}\n"  # 1.108 refuses to start without one
    config = cleanup.workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {mock_url}/v1\n"
        "      api_key: sk-dummy-not-a-real-key\n" + general
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map from the internet
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "*",
    }
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", HOST, "--port", str(port),
           "--telemetry", "False"]  # fmt: skip
    proc = cleanup.spawn("litellm", cmd, env)
    url = f"http://{HOST}:{port}"
    wait_until("GET /health/liveliness = 200", proc, lambda: http("GET", url + "/health/liveliness")[0] == 200, 240)
    return Target("litellm", url, master_key, proc)


def check_answers(target: Target) -> None:
    """A real answer before any load: a benchmark of error responses is worthless."""
    status, body = chat_ok(target.url, target.key)
    if status != 200 or b'"choices"' not in body:
        raise RuntimeError(f"{target.name} does not answer a chat completion: {status} {body[:300]!r}")
    log(f"{target.name} answers 200: {body[:160].decode(errors='replace')}…")
    if target.name == "gateway":
        status, _ = http("POST", target.url + "/v1/chat/completions", CHAT_BODY)
        if status != 401:
            raise RuntimeError(f"the gateway answered {status} without credentials: auth is not on")


def count_facts(bootstrap: str, topics: Topics, timeout: float = 60.0) -> dict[str, int]:
    """Committed records per fact topic (read_committed), read from the beginning."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-count-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "isolation.level": "read_committed", "auto.offset.reset": "earliest",
    })  # fmt: skip
    try:
        md = consumer.list_topics(timeout=10)
        tps = [TopicPartition(t, p, 0) for t in topics.facts() if t in md.topics for p in md.topics[t].partitions]
        ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        pending = {k for k, end in ends.items() if end > 0}
        consumer.assign(tps)
        counts: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + timeout
        idle = 0
        while pending and time.monotonic() < deadline and idle < 5:
            batch = consumer.consume(10000, timeout=1.0)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error() is None:
                    counts[str(msg.topic())] += 1
                    key = (str(msg.topic()), int(msg.partition() or 0))
                    if key in pending and (msg.offset() or 0) + 2 >= ends[key]:  # +1 commit marker
                        pending.discard(key)
        return {t: counts[t] for t in topics.facts()}
    finally:
        consumer.close()


# --------------------------------------------------------------------------- profiling


def py_spy_profile(target: Target, pyspy: str, args: argparse.Namespace, workdir: Path) -> int:
    """One more gateway run with py-spy attached; returns its 2xx count (they are facts too)."""
    raw = workdir / "gateway.pyspy.txt"
    seconds = args.profile_seconds
    cmd = [pyspy, "record", "--pid", str(target.proc.pid), "--duration", str(seconds), "--rate", "200",
           "--format", "raw", "--output", str(raw), "--nonblocking", "--idle"]  # fmt: skip
    log(f"profiling the gateway with py-spy for {seconds} s under the same load")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        run = wrk(target.url, target.key, seconds, args, {})
        out, _ = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    ok = run.result["ok"] if run is not None else 0
    if run is not None:
        log(f"profiled run: {run.rps:,.0f} req/s, p99 {run.ms('p99_us'):.1f} ms (py-spy costs some of it)")
    if not raw.exists():
        log(f"py-spy wrote nothing:\n{out}")
        return ok
    summarize_stacks(raw.read_text(), args.profile_top)
    if args.keep:
        log(f"raw py-spy stacks: {raw}")
    return ok


IDLE_LEAVES = ("EpollSelector.select ", "Condition.wait ", "_worker (futures/thread.py", "KeyCatalog._run ")


def summarize_stacks(text: str, top: int) -> None:
    """Per thread: how its samples split between waiting and work; for the event loop, where work goes.

    Input is py-spy's collapsed stacks ("a;b;c count", --idle so waiting shows). A leaf in
    select/Condition.wait/an idle pool worker/the key catalog's poll is waiting; a leaf in
    FactPublisher._commit is the publisher thread inside librdkafka (produce, commit).
    """
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    loop_incl: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        raw = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not raw:
            continue
        run_at = next((i for i, f in enumerate(raw) if f.startswith("Thread.run ")), None)
        # a stack without Thread.run is the main thread (py-spy cuts some event-loop stacks short)
        thread = "main (event loop)" if run_at is None or run_at + 1 >= len(raw) else _short(raw[run_at + 1])
        leaf = raw[-1].replace(" (" + raw[-1].partition(" (")[2], "") + " (" + _short_line(raw[-1]) + ")"
        per_thread[thread][leaf] += n
        if thread == "main (event loop)" and not raw[-1].startswith(IDLE_LEAVES):
            for f in {_short(x) for x in raw}:
                loop_incl[f] += n
    print("\n### py-spy: per thread (idle included)\n")
    print("| thread | samples | waiting % | top leaves (share of the thread's samples) |\n| --- | ---: | ---: | --- |")
    loop_total = 0
    for thread, leaves in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        waiting = sum(n for leaf, n in leaves.items() if leaf.startswith(IDLE_LEAVES))
        if thread == "main (event loop)":
            loop_total = total
        tops = ", ".join(f"`{leaf}` {100 * n / total:.0f}%" for leaf, n in leaves.most_common(4))
        print(f"| {thread} | {total} | {100 * waiting / total:.0f} | {tops} |")
    if not loop_total:
        return
    busy = sum(n for leaf, n in per_thread["main (event loop)"].items() if not leaf.startswith(IDLE_LEAVES))
    print(f"\n### py-spy: event loop busy {100 * busy / loop_total:.0f}% of its samples; where (inclusive, % of "
          "the loop's samples)\n")  # fmt: skip
    print("| % | frame |\n| ---: | --- |")
    skip = ("_run_module_as_main", "_run_code", "<module>", "run (", "run_app", "BaseEventLoop.run")
    for f, n in loop_incl.most_common(top * 2):
        if not f.startswith(skip):
            print(f"| {100 * n / loop_total:.1f} | `{f}` |")


def _short_line(frame: str) -> str:
    """'func (path/to/module.py:123)' → 'module.py:123'."""
    where = frame.partition(" (")[2].rstrip(")")
    parts = Path(where).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else where


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' → 'func (module.py)': lines merged, so a function is one row."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


# --------------------------------------------------------------------------- report


def machine_notes(venv: Path | None, litellm: str | None) -> list[str]:
    mem_kib = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    jar = next((p.name for p in (REPO / ".cache" / "kafka" / "libs").glob("kafka_2.13-*.jar")), "kafka ?")
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("Copyright")[0]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "gateway", "streams", "domain"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return [
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{mem_kib / 1024 / 1024:.0f} GiB, {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}, {jar.removesuffix('.jar')} (KRaft, single node, same machine)",
        f"LiteLLM {litellm}" if litellm else "LiteLLM: not run",
        f"load: {wrk_v.strip()}, same machine",
        f"code: {git}{' + uncommitted changes in gateway/streams/domain' if dirty else ''}",
    ]


def report(runs: list[Run], args: argparse.Namespace, facts: dict[str, int] | None, gw_2xx: int) -> None:
    print(f"\n### Runs ({args.connections} connections, {args.threads} wrk threads, {args.seconds} s each after "
          f"{args.warmup} s warm-up, {args.tokens}-token answers)\n")  # fmt: skip
    print("| run | target | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx | other errors "
          "| server CPU % | broker CPU % | mock CPU % | wrk CPU % |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(runs, 1):
        res = r.result
        other = r.failures - res["non2xx_hook"]
        pct = {k: 100 * v / r.seconds for k, v in r.cpu.items()}
        print(f"| {i} | {r.target} | {r.rps:,.0f} | {r.ms('p50_us'):.1f} | {r.ms('p90_us'):.1f} | "
              f"{r.ms('p99_us'):.1f} | {r.ms('p999_us'):.1f} | {r.ms('max_us'):.1f} | {res['non2xx_hook']} | "
              f"{other} | {pct.get('server', 0):.0f} | {pct.get('kafka', 0):.0f} | {pct.get('mock', 0):.0f} | "
              f"{pct.get('wrk', 0):.0f} |")  # fmt: skip
    bad = [r for r in runs if r.failures or r.result["non2xx_wrk"]]
    for r in bad:
        log(f"WARNING {r.target}: {r.failures} failed responses; first: {r.result['first_bad']}")
    by: dict[str, list[Run]] = collections.defaultdict(list)
    for r in runs:
        by[r.target].append(r)
    print("\n### Summary\n")
    print("| target | runs | req/s | p50 ms | p99 ms | non-2xx |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    agg: dict[str, tuple[float, float, float]] = {}
    for name, rs in by.items():
        rps = statistics.mean(r.rps for r in rs)
        p50 = statistics.mean(r.ms("p50_us") for r in rs)
        p99 = statistics.mean(r.ms("p99_us") for r in rs)
        agg[name] = (rps, p50, p99)
        non2xx = sum(r.result["non2xx_hook"] for r in rs)
        print(f"| {name} | {len(rs)} | {rps:,.0f} | {p50:.1f} | {p99:.1f} | {non2xx} |")
    if "gateway" in agg and "litellm" in agg:
        g, lt = agg["gateway"], agg["litellm"]
        speed, tail = g[0] / lt[0], lt[2] / g[2]
        verdict = {True: "met", False: "NOT met"}
        print(f"\nours/litellm req/s = **{speed:.1f}×** (goal ≥ 10×: {verdict[speed >= 10]}); "
              f"litellm p99 / ours p99 = **{tail:.1f}×** (goal ≥ 10×: {verdict[tail >= 10]})")  # fmt: skip
    if "gateway" in agg and "baseline" in agg:
        g, b = agg["gateway"], agg["baseline"]
        print(f"\ngateway / baseline ({args.baseline_env}): req/s {g[0] / b[0]:.2f}×, p99 {g[2] / b[2]:.2f}×")
    if facts is not None:
        print(f"\nfacts committed in Kafka (read_committed): {facts}; gateway 2xx answers seen by wrk "
              f"(sanity + warm-ups + runs + profiled run): {gw_2xx}; the difference is requests in flight "
              "when a wrk run ended (committed, answer not read)")  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=30, help="measured seconds per run")
    p.add_argument("--warmup", type=int, default=5, help="warm-up seconds before each measured run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--order", default="gateway,litellm,gateway", help="targets, interleaved in this order")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per mock answer")
    p.add_argument("--partitions", type=int, default=12, help="partitions per fact topic")
    p.add_argument("--rate-requests-per-min", type=int, default=100_000_000)
    p.add_argument("--rate-tokens-per-min", type=int, default=1_000_000_000)
    p.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    p.add_argument("--profile", choices=["none", "py-spy"], default="none", help="an extra profiled gateway run")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy", help="py-spy binary")
    p.add_argument("--profile-seconds", type=int, default=20)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--soak-minutes", type=float, default=0, help="gateway alone: steady load, RSS every interval")
    p.add_argument("--soak-interval", type=int, default=30, help="seconds between RSS samples in a soak")
    p.add_argument(
        "--baseline-env", default="", metavar="K=V,...",
        help="also start a second gateway, 'baseline', with these settings (e.g. LEDGERFLOW_GATEWAY_UVLOOP=false) "
        "for an A/B comparison in the same run; name it in --order",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs, profiles)")
    args = p.parse_args(argv)
    args.order = [t.strip() for t in args.order.split(",") if t.strip()]
    args.baseline = dict(kv.split("=", 1) for kv in args.baseline_env.split(",") if kv.strip())
    if not set(args.order) <= {"gateway", "litellm", "baseline"}:
        p.error("--order takes gateway, litellm and baseline only")
    if "baseline" in args.order and not args.baseline:
        p.error("--order names baseline: give its settings with --baseline-env")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    cleanup = Cleanup(workdir=Path(tempfile.mkdtemp(prefix="lf-bench-gw-")), keep_workdir=args.keep)
    atexit.register(cleanup.close)
    began = time.monotonic()
    try:
        return _bench(args, cleanup)
    finally:
        cleanup.close()
        log(f"done in {time.monotonic() - began:.0f} s")


def _bench(args: argparse.Namespace, cleanup: Cleanup) -> int:
    soak = args.soak_minutes > 0
    want_litellm = "litellm" in args.order and not soak
    venv: Path = args.litellm_venv
    version = None
    if want_litellm and not (venv / "bin" / "litellm").exists():
        log(f"no LiteLLM in {venv} (python -m venv {venv} && {venv}/bin/pip install 'litellm[proxy]'): gateway alone")
        want_litellm = False
    if want_litellm:
        version = litellm_version(venv)

    bootstrap = start_kafka(cleanup)
    topics = Topics(f"bench{uuid.uuid4().hex[:8]}.", args.partitions)
    ensure_topics(bootstrap, topics)
    log(f"topics created with prefix {topics.prefix} ({args.partitions} partitions each)")
    mock, mock_url = start_mock(cleanup, args.tokens)
    targets = {"gateway": start_gateway(cleanup, bootstrap, topics, mock_url, args)}
    if args.baseline and not soak:
        targets["baseline"] = start_gateway(cleanup, bootstrap, topics, mock_url, args, "baseline", args.baseline)
    if want_litellm:
        try:
            targets["litellm"] = start_litellm(cleanup, venv, mock_url)
        except RuntimeError as exc:
            log(f"LiteLLM did not start, benchmarking the gateway alone: {exc}")
    for t in targets.values():
        check_answers(t)

    broker = kafka_pid(cleanup)
    notes = machine_notes(venv if want_litellm else None, version)
    print("\n## Machine\n\n" + "\n".join(f"- {n}" for n in notes))
    gw_2xx = sum(1 for name in targets if name != "litellm")  # the sanity answers

    def watch(t: Target) -> dict[str, int]:
        w = {"server": t.proc.pid, "mock": mock.pid}
        if broker is not None:
            w["kafka"] = broker
        return w

    def measure(t: Target, seconds: float, label: str) -> Run | None:
        nonlocal gw_2xx
        if args.warmup > 0:
            warm = wrk(t.url, t.key, args.warmup, args, {})
            if warm is not None and t.name != "litellm":
                gw_2xx += warm.result["ok"]
        run = wrk(t.url, t.key, seconds, args, watch(t))
        if run is not None:
            run.target, run.label = t.name, label
            if t.name != "litellm":
                gw_2xx += run.result["ok"]
            log(f"{label} {t.name}: {run.rps:,.0f} req/s, p50 {run.ms('p50_us'):.1f} ms, p99 "
                f"{run.ms('p99_us'):.1f} ms, failures {run.failures}, RSS {rss_mib(t.proc.pid):.0f} MiB")  # fmt: skip
        return run

    if soak:
        return _soak(args, targets["gateway"], measure)

    runs = []
    for i, name in enumerate(args.order, 1):
        if name in targets:
            run = measure(targets[name], args.seconds, f"run {i}")
            if run is not None:
                runs.append(run)
    if args.profile == "py-spy":
        if Path(args.py_spy).exists() or shutil.which(args.py_spy):
            gw_2xx += py_spy_profile(targets["gateway"], args.py_spy, args, cleanup.workdir or Path("."))
        else:
            log(f"py-spy not found at {args.py_spy}: pip install --target /tmp/pyspy py-spy")
    facts = count_facts(bootstrap, topics)
    report(runs, args, facts, gw_2xx)
    return 0 if runs and not any(r.failures for r in runs) else 1


def _soak(args: argparse.Namespace, gw: Target, measure: Callable[[Target, float, str], Run | None]) -> int:
    segments = max(1, round(args.soak_minutes * 60 / args.soak_interval))
    print(f"\n### Soak: gateway alone, {args.connections} connections, {segments} × {args.soak_interval} s\n")
    print("| t (min) | RSS MiB | req/s | p99 ms | non-2xx + errors |\n| ---: | ---: | ---: | ---: | ---: |")
    if args.warmup > 0:  # the baseline is taken warm; then one continuous load, no pauses
        wrk(gw.url, gw.key, args.warmup, args, {})
        args.warmup = 0
    start = time.monotonic()
    series = [rss_mib(gw.proc.pid)]
    print(f"| 0.0 | {series[0]:.1f} | – | – | – |", flush=True)
    failures = 0
    for i in range(segments):
        run = measure(gw, args.soak_interval, f"soak {i + 1}/{segments}")
        series.append(rss_mib(gw.proc.pid))
        t = (time.monotonic() - start) / 60
        if run is None:
            print(f"| {t:.1f} | {series[-1]:.1f} | wrk failed | | |", flush=True)
            failures += 1
            continue
        failures += run.failures
        print(f"| {t:.1f} | {series[-1]:.1f} | {run.rps:,.0f} | {run.ms('p99_us'):.1f} | {run.failures} |", flush=True)
    half = series[len(series) // 2 :]
    print(f"\nRSS MiB: start {series[0]:.1f}, end {series[-1]:.1f}, max {max(series):.1f}; "
          f"second half {min(half):.1f}–{max(half):.1f}")  # fmt: skip
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
