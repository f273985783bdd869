"""docs/events.md is generated from the .avsc docs; CI fails when it drifts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from streams.schemas import load_all

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_event_docs.py"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_event_docs", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_page_is_up_to_date() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the script imports streams, installed or not
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    gen = _generator()
    stale = tmp_path / "events.md"
    stale.write_text(gen.render().replace("Common header.", "Common header, edited by hand.", 1))
    assert gen.main(["--check", "--output", str(stale)]) == 1
    assert gen.main(["--output", str(stale)]) == 0
    assert gen.main(["--check", "--output", str(stale)]) == 0


def test_every_event_and_field_is_documented_on_the_page() -> None:
    page = (REPO / "docs" / "events.md").read_text()
    assert "## Envelope" in page and page.count("| `event_id` |") == 1  # the envelope once, at the top
    for name, schema in load_all().items():
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for field in schema.raw["fields"]:
            assert f"| `{field['name']}` |" in section, f"{name}.{field['name']}"
    assert "`ledgerflow.token-charges`" in page and "none yet" in page
