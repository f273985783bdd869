"""The full chaos run of issue 10 (on demand): 100k events under SIGKILLs, a broker restart and
a 30 s store outage, then the same checks as the CI test (`tests/test_chaos_kafka.py`).

    .venv/bin/python bench/chaos.py [--requests 25000] [--produce-s 90] [--kill-every-s 4]

Loopback only, bounded, stops by itself; prints the report and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos import ChaosPlan, run  # noqa: E402
from tests.conftest import free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=25_000, help="requests (4 facts each)")
    ap.add_argument("--produce-s", type=float, default=90.0)
    ap.add_argument("--kill-every-s", type=float, default=4.0)
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--broker-restart-at-s", type=float, default=40.0)
    args = ap.parse_args()
    plan = ChaosPlan(
        requests=args.requests,
        produce_s=args.produce_s,
        kill_every_s=args.kill_every_s,
        outage_s=args.outage_s,
        broker_restart_at_s=args.broker_restart_at_s,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ledgerflow-chaos-") as tmp:
        ports = (free_port(), free_port(), free_port(), free_port(), free_port())
        report = run(plan, Path(tmp), REPO / ".cache" / "kafka", ports, log=lambda m: print(f"[chaos] {m}", flush=True))
    print(report.render())
    print(f"wall time:           {time.monotonic() - started:.0f}s")
    if not report.ok:
        print(report.ledger_verify_out[-2000:], report.replay_check_out[-2000:], sep="\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
