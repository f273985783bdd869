from __future__ import annotations

from pathlib import Path

import pytest

from ledgerflow.settings import SettingsError, load


def test_defaults_then_toml_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "lf.toml"
    toml.write_text('gateway_port = 9001\ntopic_prefix = "x."\n')
    monkeypatch.setenv("LEDGERFLOW_CONFIG", str(toml))
    monkeypatch.setenv("LEDGERFLOW_TOPIC_PREFIX", "y.")
    s = load()
    assert s.gateway_port == 9001  # from TOML
    assert s.topic_prefix == "y."  # env wins over TOML
    assert s.partitions == 12  # default


def test_error_names_the_key_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGERFLOW_GATEWAY_PORT", "eighty")
    with pytest.raises(SettingsError) as exc:
        load()
    assert "gateway_port" in str(exc.value) and "LEDGERFLOW_GATEWAY_PORT" in str(exc.value)


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEDGERFLOW_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match=r"nope\.toml"):
        load()


def test_bad_clickhouse_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGERFLOW_CLICKHOUSE_URL", "mysql://x")
    with pytest.raises(SettingsError, match="clickhouse_url"):
        load()
