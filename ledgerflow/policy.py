"""`ledgerflow policy ...`: publish, list, roll back and diff Cedar policy bundles (being built)."""

from __future__ import annotations

from typing import Any

from ledgerflow.settings import Settings


def add_parser(sub: Any) -> None:
    p = sub.add_parser("policy", help="publish, list, roll back and diff policy bundles")
    p.add_subparsers(dest="policy_command", required=True)


def cmd(settings: Settings, args: Any) -> int:
    raise NotImplementedError(args.policy_command)
