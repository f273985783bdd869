"""`ledgerflow` command line: up, down, scale, status, query, demo, keys, dlq, replay, audit, policy.

The only module that knows every side; it starts them as processes and talks to them over
Kafka and HTTP, so each side stays a separate, separately scalable process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from ledgerflow import audit, billing, budgets, dlq, policy, prices, readside, route_eval
from ledgerflow import demo as demo_mod
from ledgerflow import dp as dp_cli
from ledgerflow.settings import Settings, SettingsError, load
from ledgerflow.supervisor import Child, Pool, Supervisor, pid_alive, read_scale, read_state, write_scale

if TYPE_CHECKING:
    from infra.redis import RedisConfig
    from streams.admin import PartitionOwner

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledgerflow", description="Event-sourced control plane for LLM traffic.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Kafka (if none configured), the agents, the sink and the gateway")
    up.add_argument("--demo", type=int, default=0, metavar="N", help="after start, send N sample requests")
    up.add_argument("--exit-after-demo", action="store_true", help="stop everything once the demo has printed")
    up.add_argument("--poison", action="store_true", help="with --demo: also produce one hand-made poison record")
    sub.add_parser("down", help="stop what `up` started")
    sc = sub.add_parser(
        "scale",
        help="run N agent workers in one consumer group under the running `up` (embedded mode)",
        description="Resize a process pool of the running `ledgerflow up`: workers=N runs agent workers "
        "agents-0..N-1, each with its own data directory (data_dir/agents/<i>) and web port "
        "(worker_web_port + i); Kafka rebalances the partitions among them.",
    )
    sc.add_argument("spec", metavar="workers=N", help="workers=N (sinks=N is refused in the embedded mode)")
    sc.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the new count to be up")
    sub.add_parser("status", help="processes, topics, and per group and partition the owner and the lag")
    sub.add_parser("token", help="print the operator's read-side token (for curl, clickhouse-client, BI tools)")
    q = sub.add_parser("query", help="run read-only SQL against the projections")
    q.add_argument("sql")
    q.add_argument("--format", default="PrettyCompactMonoBlock")
    d = sub.add_parser("demo", help="send sample requests over HTTP and print a summary from ClickHouse")
    d.add_argument("-n", type=int, default=200)
    d.add_argument("--poison", action="store_true", help="also produce one hand-made poison record")
    d.add_argument(
        "--no-spike", dest="spike", action="store_false", help="skip the injected cost spike (on by default)"
    )
    k = sub.add_parser("keys", help="issue, revoke and list API keys (events on the api-keys topic)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("issue", help="issue a key for a tenant; prints the secret once")
    ki.add_argument("--tenant", required=True, type=_tenant_name)
    ki.add_argument("--role", action="append", dest="roles", default=None)
    ki.add_argument("--label")
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    kr.add_argument("--reason", default="user_request")
    ksub.add_parser("list", help="keys issued and not revoked (ids and hashes only)")
    dl = sub.add_parser("dlq", help="inspect and re-drive dead letters")
    dsub = dl.add_subparsers(dest="dlq_command", required=True)
    dsub.add_parser("list", help="every dead letter with its reason and source")
    show = dsub.add_parser("show", help="one dead letter in full")
    show.add_argument("id")
    rd = dsub.add_parser("redrive", help="put records back on their source topic once they decode")
    rd.add_argument("ids", nargs="*")
    rd.add_argument("--all", action="store_true")
    rd.add_argument("--dry-run", action="store_true")
    rp = sub.add_parser(
        "replay",
        help="rebuild projections into a fresh database from the log (progress bar, ETA), or --check it",
        description="Rebuild projections from the Kafka log into another database, inside the projections "
        "service; with --check, compare that database with the live one table by table.",
    )
    rp.add_argument("--into", required=True, metavar="DB", help="database to rebuild into (not the live one)")
    rp.add_argument("--since", metavar="T", help="keep only events with occurred_at >= T (ISO-8601, UTC if no offset)")
    rp.add_argument("--tables", metavar="t1,t2", help="only these tables (default: every projection table)")
    rp.add_argument("--check", action="store_true", help="compare DB with the live database; exit 1 if they differ")
    rp.add_argument("--replace", action="store_true", help="drop DB first (a DB holding rows is refused otherwise)")
    audit.add_parser(sub)
    policy.add_parser(sub)
    prices.add_parser(sub)
    budgets.add_parser(sub)
    billing.add_parser(sub)
    route_eval.add_parser(sub)
    dp_cli.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        settings = load()
    except SettingsError as exc:
        print(f"ledgerflow: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            return cmd_up(settings, args.demo, args.exit_after_demo, args.poison)
        if args.command == "down":
            return cmd_down(settings)
        if args.command == "scale":
            return cmd_scale(settings, args.spec, args.timeout)
        if args.command == "token":
            print(readside.operator_token(settings))
            return 0
        if args.command == "status":
            return cmd_status(settings)
        if args.command == "query":
            return cmd_query(settings, args.sql, args.format)
        if args.command == "demo":
            return demo_mod.run(settings, args.n, poison=args.poison, spike=args.spike)
        if args.command == "keys":
            return cmd_keys(settings, args)
        if args.command == "dlq":
            if args.dlq_command == "list":
                return dlq.cmd_list(settings)
            if args.dlq_command == "show":
                return dlq.cmd_show(settings, args.id)
            if not args.ids and not args.all:
                print(
                    "name the dead letters to re-drive (ids from `ledgerflow dlq list`) or pass --all", file=sys.stderr
                )
                return 2
            return dlq.cmd_redrive(settings, args.ids, args.all, args.dry_run)
        if args.command == "replay":
            return cmd_replay(settings, args)
        if args.command == "audit":
            return audit.cmd(settings, args)
        if args.command == "policy":
            return policy.cmd(settings, args)
        if args.command == "prices":
            return prices.cmd(settings, args)
        if args.command == "budgets":
            return budgets.cmd(settings, args)
        if args.command == "billing":
            return billing.cmd(settings, args)
        if args.command == "route-eval":
            return route_eval.cmd(settings, args)
        if args.command == "dp":
            return dp_cli.cmd(settings, args)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        print(f"ledgerflow: {exc}", file=sys.stderr)
        return 1
    except PlatformError as exc:
        print(f"ledgerflow: {exc}", file=sys.stderr)
        return 1
    return 2


class PlatformError(RuntimeError):
    """A failure with a message that says what to do; printed without a stack trace."""


# --- up / down ---------------------------------------------------------------------------


def state_file(settings: Settings) -> Path:
    return settings.resolved_data_dir / "run" / "up.json"


def scale_file(settings: Settings) -> Path:
    """Desired pool sizes, written by `ledgerflow scale`, read by the `up` supervisor each loop."""
    return settings.resolved_data_dir / "run" / "scale.json"


def kafka_config(settings: Settings):  # type: ignore[no-untyped-def]
    from infra.kafka.runner import KafkaConfig

    return KafkaConfig(
        home=settings.resolved_data_dir / "kafka",
        cache=(REPO / settings.jar_cache) if not settings.jar_cache.is_absolute() else settings.jar_cache,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        heap_mb=settings.kafka_heap_mb,
    )


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LEDGERFLOW_KAFKA_BOOTSTRAP": settings.bootstrap,
            "LEDGERFLOW_DATA_DIR": str(settings.resolved_data_dir),
            "PYTHONUNBUFFERED": "1",
            # issue 11: logs and traces as configured here (a TOML file included), for every child
            "LEDGERFLOW_LOG_FORMAT": settings.log_format,
            "LEDGERFLOW_OTEL_EXPORTER": settings.otel_exporter,
            "LEDGERFLOW_OTEL_ENDPOINT": settings.otel_endpoint,
            "LEDGERFLOW_OTEL_FILE": settings.otel_file_path,
            "LEDGERFLOW_OTEL_SAMPLE_RATIO": str(settings.otel_sample_ratio),
        }
    )
    return env


def children(settings: Settings, redis_url: str = "") -> list[Child]:
    py = sys.executable
    logs = settings.resolved_data_dir / "logs"
    env = child_env(settings)
    token_file, keys_file = readside.prepare_files(settings)
    return [
        Child(
            "projections",
            [
                py,
                "-m",
                "projections",
                "--bootstrap",
                settings.bootstrap,
                "--group",
                settings.sink_group,
                "--topic-prefix",
                settings.topic_prefix,
                "--partitions",
                str(settings.partitions),
                "--store",
                settings.store_url,
                "--database",
                settings.clickhouse_database,
                "--host",
                settings.projections_host,
                "--port",
                str(settings.projections_port),
                "--batch-max",
                str(settings.sink_batch_max),
                "--batch-ms",
                str(settings.sink_batch_ms),
                "--log-level",
                settings.log_level,
                "--instance-id",
                f"{settings.sink_group}-0",
                "--token-file",
                str(token_file),
                "--api-keys-file",
                str(keys_file),
                *(["--allow-fault-injection"] if settings.fault_injection else []),
                *lag_args(settings),
            ],
            logs / "projections.log",
            env,
            settings.projections_url,
            metrics=f"{settings.projections_url}/metrics",
        ),
        *(worker_child(settings, i) for i in range(settings.workers)),
        transactional_worker(settings, "ledger", "agents.ledger", logs / "ledger.log", env),
        transactional_worker(settings, "dp-budget", "agents.dp_budget", logs / "dp-budget.log", env),
        *(  # issue 9: one learner for the platform's routing priors, when the router is on
            [transactional_worker(settings, "routing-priors", "agents.priors", logs / "priors.log", env)]
            if settings.routing_enabled
            else []
        ),
        *gateway_children(settings, redis_url),
    ]


WORKER_POOL = "agents"
# issue 11: /metrics ports of the workers without a web server, as offsets from agent_metrics_port
METRICS_OFFSETS = {"ledger": 0, "dp-budget": 1, "routing-priors": 2}


def transactional_worker(settings: Settings, name: str, module: str, log: Path, env: dict[str, str]) -> Child:
    """A consume-transform-produce worker (ledger, dp-budget, routing-priors) and its /metrics port."""
    argv = [sys.executable, "-m", module, "--loglevel", "warning"]
    metrics = ""
    if settings.agent_metrics_port:
        port = settings.agent_metrics_port + METRICS_OFFSETS[name]
        argv += ["--metrics-port", str(port), "--metrics-host", settings.agent_metrics_host]
        metrics = f"http://{settings.agent_metrics_host}:{port}/metrics"
    return Child(name, argv, log, env, metrics=metrics)


def lag_args(settings: Settings) -> list[str]:
    """The projections service's lag sampler: every consumer group `up` runs, with the topics it reads.

    The Faust worker's group reads the catalogue topics its agents subscribe to (token-charges,
    and request-completions once the SLO agent's topic exists); the other groups their sources.
    """
    if not settings.lag_sample_interval_s:
        return []
    from streams.topics import Topics

    topics = Topics(settings.topic_prefix, settings.partitions)
    faust_sources = [k for k in ("token-charges", "request-completions") if topics.spec_for(topics.name(k))]
    specs = [
        f"{settings.sink_group}=*",
        f"{settings.worker_id}={','.join(faust_sources)}",
        f"{settings.worker_id}-ledger=audit",
        f"{settings.worker_id}-dp-budget=dp-budget-log",
    ]
    if settings.routing_enabled:
        from agents.priors import source_topics

        keys = [t.removeprefix(settings.topic_prefix) for t in source_topics(topics)]
        specs.append(f"{settings.worker_id}-routing-priors={','.join(keys)}")
    return ["--lag-interval", str(settings.lag_sample_interval_s), *(a for s in specs for a in ("--lag-group", s))]


def gateway_children(settings: Settings, redis_url: str = "") -> list[Child]:
    """The gateway replicas: "gateway", or with `gateways` = N > 1 "gateway-0".."gateway-<N-1>".

    Replica i listens on gateway_port + i with its own instance id (its transactional.id: two
    replicas sharing one would fence each other's transactions) and uses `redis_url` for the
    rate limits and the memory window they share.
    """
    logs = settings.resolved_data_dir / "logs"
    env = child_env(settings)
    if redis_url:
        env["LEDGERFLOW_REDIS_URL"] = redis_url
    if settings.gateways == 1:
        url, argv = settings.gateway_url, [sys.executable, "-m", "gateway"]
        return [Child("gateway", argv, logs / "gateway.log", env, url, metrics=url + "/metrics")]
    out = []
    for i in range(settings.gateways):
        port = settings.gateway_port + i
        own = {
            **env,
            "LEDGERFLOW_GATEWAY_PORT": str(port),
            "LEDGERFLOW_GATEWAY_INSTANCE_ID": f"{settings.instance_id}-{i}",
        }
        url = f"http://{settings.gateway_host}:{port}"
        argv = [sys.executable, "-m", "gateway"]
        out.append(Child(f"gateway-{i}", argv, logs / f"gateway-{i}.log", own, url, metrics=f"{url}/metrics"))
    return out


def start_redis(settings: Settings) -> RedisConfig | None:
    """With several gateways and no `redis_url`: a local redis-server on a free loopback port."""
    if settings.gateways == 1 or settings.redis_url:
        return None
    import socket

    from infra.redis import RedisConfig, RedisServerError, log_path, start

    home = settings.resolved_data_dir / "redis"
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cfg = RedisConfig(home=home, port=port)
    try:
        start(cfg)
    except RedisServerError as exc:
        raise PlatformError(str(exc)) from None
    print(f"{'redis:':<12} {cfg.url}  (log: {log_path(cfg)}; shared by {settings.gateways} gateways)", flush=True)
    return cfg


def stop_redis(state: dict[str, object]) -> None:
    """Stop the redis-server `up` started (its home and port are in the run state)."""
    found = state.get("redis")
    if isinstance(found, dict):
        from infra.redis import RedisConfig, stop

        stop(RedisConfig(home=Path(str(found["home"])), port=int(found["port"])))


def worker_child(settings: Settings, i: int) -> Child:
    """Agent worker i of the consumer group: own data directory and web port, same group id.

    The worker reads its data directory from LEDGERFLOW_DATA_DIR (Faust's datadir is
    `<that>/agents`), so worker i gets `data_dir/agents/<i>/agents`; two workers must not
    share a Faust datadir or a web port.
    """
    env = child_env(settings)
    home = settings.resolved_data_dir / "agents" / str(i)
    home.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level of its datadir
    env["LEDGERFLOW_DATA_DIR"] = str(home)
    env["LEDGERFLOW_WORKER_WEB_PORT"] = str(settings.worker_web_port + i)
    return Child(
        f"{WORKER_POOL}-{i}",
        [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
        settings.resolved_data_dir / "logs" / f"{WORKER_POOL}-{i}.log",
        env,
        f"http://127.0.0.1:{settings.worker_web_port + i}",
        metrics=f"http://127.0.0.1:{settings.worker_web_port + i}/metrics",  # issue 11: a Faust web view
    )


def worker_pool(settings: Settings) -> Pool:
    return Pool(WORKER_POOL, "workers", lambda i: worker_child(settings, i), settings.workers)


def cmd_up(settings: Settings, demo_n: int, exit_after_demo: bool, poison: bool = False) -> int:
    existing = read_state(state_file(settings))
    if existing and pid_alive(existing.get("supervisor_pid")):
        raise PlatformError(f"already running (pid {existing['supervisor_pid']}); `ledgerflow down` stops it")
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    kafka_started = False
    if settings.embedded_kafka:
        from infra.kafka.runner import KafkaError, ensure_jars, log_path, start

        cfg = kafka_config(settings)
        try:
            ensure_jars(cfg.cache)
            print(f"kafka: starting Apache Kafka (KRaft) on {cfg.bootstrap} ...", flush=True)
            start(cfg)
        except KafkaError as exc:
            raise PlatformError(str(exc)) from None
        kafka_started = True
        print(f"kafka:       {cfg.bootstrap}  (log: {log_path(cfg)})", flush=True)
    from streams.admin import ensure_topics
    from streams.topics import Topics

    try:
        ensure_topics(settings.bootstrap, Topics(settings.topic_prefix, settings.partitions))
    except Exception as exc:
        raise PlatformError(f"cannot create topics on {settings.bootstrap}: {exc}") from None
    redis = start_redis(settings)
    run_state: dict[str, object] = {"kafka_started": kafka_started}
    if redis is not None:
        run_state["redis"] = {"home": str(redis.home), "port": redis.port}
    sup = Supervisor(
        children(settings, redis.url if redis is not None else settings.redis_url),
        state_file(settings),
        run_state,
        pools=[worker_pool(settings)],
        control_file=scale_file(settings),
    )
    try:
        sup.init_pools()
        sup.start_all()
        wait_ready(sup)
        for c in sup.children:
            print(f"{c.name + ':':<12} {c.url}  (log: {c.log})", flush=True)
        print("metrics:     Prometheus /metrics (the read side's takes `Authorization: Bearer $(ledgerflow token)`):")
        for c in sup.children:
            if c.metrics:
                print(f"  {c.name + ':':<14} {c.metrics}", flush=True)
        print(f"clickhouse:  {settings.store_url} (SQL over {settings.projections_url})", flush=True)
        print(f"portal:      {settings.projections_url}/portal/  (log in with `ledgerflow token`)", flush=True)
        print("ready. `ledgerflow demo` sends traffic; `ledgerflow status` shows lag; Ctrl-C stops.", flush=True)
        if demo_n:
            demo_mod.run(settings, demo_n, poison=poison)
        if not exit_after_demo:
            sup.run()
    finally:
        print("stopping ...", flush=True)
        sup.stop_all()
        stop_redis(run_state)
        if kafka_started:
            from infra.kafka.runner import stop

            stop(kafka_config(settings))
        print("stopped.", flush=True)
    return 0


def wait_ready(sup: Supervisor, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    pending = {c.name: c for c in sup.children}
    paths = {"projections": "/readyz", "gateway": "/readyz"}  # agent workers: "/"; gateway-i as gateway
    while pending and time.monotonic() < deadline:
        for name, c in list(pending.items()):
            if not c.alive:
                tail = c.log.read_text(errors="replace").splitlines()[-15:] if c.log.exists() else []
                raise PlatformError(f"{name} exited during start; its log {c.log} ends:\n  " + "\n  ".join(tail))
            path = paths.get(name) or paths.get(name.rpartition("-")[0], "/")
            if not c.url or http_ok(c.url + path):  # no HTTP face (the ledger): alive is ready
                del pending[name]
        time.sleep(0.3)
    if pending:
        raise PlatformError(
            f"not ready after {timeout:.0f}s: {', '.join(pending)}; see logs in {sup.children[0].log.parent}"
        )


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def cmd_down(settings: Settings) -> int:
    state = read_state(state_file(settings))
    if not state:
        print("nothing is running (no run state).")
        return 0
    pid = state.get("supervisor_pid")
    if isinstance(pid, int) and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        print("stopped." if not pid_alive(pid) else f"supervisor {pid} did not stop in 60 s")
        return 0
    # Supervisor gone (killed): stop what it left behind.
    for child in state.get("children", []):
        cpid = child.get("pid")
        if pid_alive(cpid):
            os.kill(cpid, signal.SIGTERM)
    stop_redis(state)
    if state.get("kafka_started"):
        from infra.kafka.runner import stop

        stop(kafka_config(settings))
    state_file(settings).unlink(missing_ok=True)
    print("stopped leftovers of a supervisor that had died.")
    return 0


def _tenant_name(text: str) -> str:
    from domain.tenants import tenant_problem

    problem = tenant_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from ledgerflow import keys

    if args.keys_command == "issue":
        key_id, secret = keys.issue(settings, args.tenant, args.roles or ["user"], args.label)
        print(f"issued {key_id} for tenant {args.tenant}. The key, shown this once:\n{secret}")
        return 0
    if args.keys_command == "revoke":
        if keys.revoke(settings, args.key_id, args.reason):
            print(f"revoked {args.key_id}")
            return 0
        print(f"no key {args.key_id!r} was issued through the api-keys topic", file=sys.stderr)
        return 1
    for key in keys.list_keys(settings):
        print(f"{key.key_id:<18} {key.tenant:<16} {','.join(key.roles):<12} {key.label or ''}")
    return 0


# --- status / query ------------------------------------------------------------------------


def cmd_scale(settings: Settings, spec: str, timeout: float = 60.0) -> int:
    """`scale workers=N`: record N in the control file; the running supervisor starts/stops workers."""
    key, _, value = spec.partition("=")
    if key == "sinks":
        raise PlatformError(
            "the embedded mode runs one sink: chDB allows one process per data path, and the sink lives in "
            "the projections service that owns it. Against a ClickHouse server, run more `python -m projections` "
            f"processes with --group {settings.sink_group} instead."
        )
    if key != "workers" or not value.isdigit() or not 0 <= int(value) <= 64:
        raise ValueError(f"expected workers=N with 0 <= N <= 64, got {spec!r}")
    count = int(value)
    state = read_state(state_file(settings))
    if not state or not pid_alive(state.get("supervisor_pid")):
        raise PlatformError(
            "`ledgerflow up` is not running here; start it with LEDGERFLOW_WORKERS=N (or `workers = N` in the config)"
        )
    write_scale(scale_file(settings), "workers", count)
    deadline = time.monotonic() + timeout
    pool = worker_pool(settings)
    while True:
        state = read_state(state_file(settings)) or {}
        members = [c for c in state.get("children", []) if pool.owns(c["name"])]
        running = [c for c in members if pid_alive(c.get("pid"))]
        if len(members) == len(running) == count:
            break
        if time.monotonic() > deadline:
            raise PlatformError(f"the supervisor has not reached workers={count} in {timeout:.0f} s; see its output")
        time.sleep(0.3)
    print(f"workers={count}: " + (", ".join(f"{c['name']} (pid {c['pid']}, {c['url']})" for c in running) or "none"))
    print("partitions move to the new members at the next rebalance; `ledgerflow status` shows the owners.")
    return 0


def cmd_status(settings: Settings) -> int:
    from streams.admin import describe_group, list_groups
    from streams.topics import Topics

    state = read_state(state_file(settings)) or {}
    print("processes:")
    if not state:
        print("  (not started by `ledgerflow up` here)")
    for child in state.get("children", []):
        alive = "up" if pid_alive(child.get("pid")) else "DOWN"
        print(f"  {child['name']:<12} {alive:<5} pid {child.get('pid')}  {child.get('url', '')}")
        if child.get("metrics"):
            print(f"  {'':<12} metrics {child['metrics']}")
    desired = read_scale(scale_file(settings)).get("workers") if state else None
    if desired is not None:
        print(f"  agent workers wanted: {desired} (`ledgerflow scale workers=N`)")
    topics = Topics(settings.topic_prefix, settings.partitions)
    try:
        from streams.admin import admin

        md = admin(settings.bootstrap).list_topics(timeout=5)
    except Exception as exc:
        raise PlatformError(f"kafka unreachable at {settings.bootstrap}: {exc}") from None
    print(f"topics ({settings.bootstrap}):")
    for name in topics.all():
        parts = len(md.topics[name].partitions) if name in md.topics else 0
        print(f"  {name:<40} {'missing' if not parts else f'{parts} partitions'}")
    groups = [g for g in list_groups(settings.bootstrap) if g in (settings.sink_group, settings.worker_id)]
    print("consumer lag:")
    if not groups:
        print("  (no consumer groups yet)")
    for group in groups:
        watched = topics.all() if group == settings.sink_group else [topics.name("token-charges")]
        desc = describe_group(settings.bootstrap, group, watched)
        total = sum(p.lag for p in desc.partitions)
        print(f"  {group:<28} {desc.state.lower()}, {desc.members} member(s), lag {total}")
        print(format_owners(desc.partitions))
    return 0


def format_owners(rows: list[PartitionOwner]) -> str:
    """The `kafka-consumer-groups --describe` table, indented under its group line."""
    header = ("TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "CONSUMER-ID", "HOST", "CLIENT-ID")
    table = [header] + [
        (
            r.topic,
            str(r.partition),
            str(r.committed) if r.committed >= 0 else "-",
            str(r.end),
            str(r.lag),
            r.member_id,
            r.host,
            r.client_id,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    """`replay --into DB [...]` rebuilds through the projections service; `--check` compares."""
    from ledgerflow import replay

    try:
        if args.check:
            if args.replace:
                print("--replace rebuilds; it does not go with --check", file=sys.stderr)
                return 2
            return replay.run_check(settings, query_text, args.into, args.tables, args.since)
        return replay.run(settings, args.into, args.tables, args.since, args.replace)
    except replay.ReplayError as exc:
        print(f"ledgerflow replay: {exc}", file=sys.stderr)
        return exc.code


def cmd_query(settings: Settings, sql: str, fmt: str) -> int:
    print(query_text(settings, sql, fmt), end="")
    return 0


def query_text(settings: Settings, sql: str, fmt: str = "TabSeparatedWithNames") -> str:
    """Read-only SQL; embedded mode goes through the process that owns the chDB store."""
    if settings.embedded_store:
        params = urllib.parse.urlencode({"database": settings.clickhouse_database, "default_format": fmt})
        req = urllib.request.Request(
            f"{settings.projections_url}/?{params}",
            data=sql.encode(),
            method="POST",
            headers=readside.auth_headers(settings),
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as exc:
            raise PlatformError(f"query failed: {exc.read().decode(errors='replace').strip()}") from None
        except urllib.error.URLError as exc:
            raise PlatformError(
                f"projections service not reachable at {settings.projections_url} ({exc.reason}); "
                "is `ledgerflow up` running?"
            ) from None
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=settings.store_url, database=settings.clickhouse_database)
    result = client.raw_query(sql, settings={"readonly": 1}, fmt=fmt)
    return result.decode()
