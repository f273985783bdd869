"""The tenant-name rule (domain.tenants) at the doors that name tenants: the CLI's key issue.

OIDC claims: tests/test_oidc.py; the ledger's refusal: tests/test_ledger_native_chain.py.
"""

from __future__ import annotations

import pytest

from domain.tenants import tenant_problem
from ledgerflow import cli


@pytest.mark.parametrize("name", ["acme", "é-corp", "t 1", "😀x", "a/b"])
def test_names_a_tenant_may_have(name: str) -> None:
    assert tenant_problem(name) is None


@pytest.mark.parametrize(
    ("name", "needle"),
    [("", "non-blank"), (" \u3000", "non-blank"), (None, "non-blank"), ("a\tb", "control"), ("x\ny", "control")],
)
def test_names_refused_say_why(name: object, needle: str) -> None:
    problem = tenant_problem(name)
    assert problem is not None and needle in problem


def test_keys_issue_refuses_a_control_character_before_touching_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["keys", "issue", "--tenant", "acme\nevil"])
    assert exit_.value.code == 2
    assert "control character" in capsys.readouterr().err
