"""Config loading: typed values, key-path errors, env overrides, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvtier.cli import main as cli_main
from kvtier.config import KVTierConfig, default_config
from kvtier.tiers.disk import DiskOptions
from kvtier.errors import ConfigError

# kvtier configs; bench-*.yaml are benchmark settings (kvtier_bench.settings), validated by their own tests.
CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")
                 if not p.name.startswith("bench-"))


def test_sizes_and_defaults() -> None:
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "64MiB"},
                                            {"kind": "disk", "capacity": "1.5GiB", "path": "/x"}]}, env={})
    assert cfg.tiers[0].capacity == 64 * 2**20
    assert cfg.tiers[1].capacity == int(1.5 * 2**30)
    assert cfg.tiers[1].codec.name == "planes"  # disk default (benchmarks/results/codecs.md)
    assert isinstance(cfg.tiers[1].options, DiskOptions) and cfg.tiers[1].options.path == "/x"
    assert cfg.tiers[0].name == "dram"


def test_config_is_frozen() -> None:
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.promote_on_hit = False  # type: ignore[misc]


@pytest.mark.parametrize(("data", "message"), [
    ({"tiers": [{"kind": "dram", "capacity": "1GiB"}, {"kind": "disk", "capacity": "lots"}]},
     "tiers[1].capacity: expected a size like 64GiB"),
    ({"tiers": [{"kind": "dram", "capacity": "1GiB", "colour": "red"}]}, "tiers[0].colour: unknown key"),
    ({"tiers": [{"kind": "floppy", "capacity": "1GiB"}]}, "tiers[0].kind: unknown tier kind 'floppy'"),
    ({"tiers": [{"kind": "dram"}]}, "tiers[0].capacity: missing"),
    ({"tiers": [{"kind": "dram", "capacity": "1MiB", "codec": {"name": "brotli"}}]}, "tiers[0].codec.name"),
    ({"tiers": [{"kind": "dram", "capacity": "1MiB"}], "connector": {"async_load": "yes"}},
     "connector.async_load: expected bool"),
    ({"tiers": [{"kind": "dram", "capacity": "1MiB"}], "promote": True}, "promote: unknown key"),
    ({"tiers": []}, "tiers: expected a non-empty list"),
    ({"tiers": [{"kind": "dram", "capacity": "1MiB"}, {"kind": "dram", "capacity": "1MiB"}]}, "duplicate tier name"),
])
def test_errors_name_the_key_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        KVTierConfig.from_dict(data, env={})


def test_env_overrides_single_keys() -> None:
    env = {"KVTIER_TIERS__1__CAPACITY": "8GiB", "KVTIER_CONNECTOR__ASYNC_LOAD": "true", "OTHER": "x"}
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1GiB"},
                                            {"kind": "disk", "capacity": "1GiB"}]}, env=env)
    assert cfg.tiers[1].capacity == 8 * 2**30
    assert cfg.connector.async_load is True
    with pytest.raises(ConfigError, match="KVTIER_TIERS__5__CAPACITY"):
        KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"}]}, env={"KVTIER_TIERS__5__CAPACITY": "1"})


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        KVTierConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        KVTierConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_reports_unknown_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("tiers:\n  - {kind: dram, capacity: 1GiB, policy: clock}\n")
    assert cli_main(["validate", str(f)]) == 2
    assert "unknown policy 'clock'" in capsys.readouterr().err


def test_secrets_never_appear_in_reprs_or_dumps(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "s3.yaml"
    f.write_text("tiers:\n  - {kind: s3, capacity: 0, bucket: b, access_key_id: AKID, secret_access_key: TOPSECRET}\n"
                 "  - {kind: redis, capacity: 0, password: HUNTER2}\n")
    cfg = KVTierConfig.from_yaml(f)
    assert "TOPSECRET" not in repr(cfg) and "HUNTER2" not in repr(cfg)
    assert cli_main(["validate", str(f), "--json"]) == 0
    out = capsys.readouterr().out
    assert "TOPSECRET" not in out and "HUNTER2" not in out and "***" in out
    assert cfg.tiers[0].options.secret_access_key == "TOPSECRET"  # type: ignore[union-attr]
