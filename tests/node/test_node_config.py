"""`peer_addresses` reroutes a node's replication traffic (the chaos proxies depend on it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidelog.node.config import Address, ConfigError, load_config
from tidelog.node.main import add_node_arguments, config_from_args


def test_repeated_flags_and_a_toml_table_give_the_same_overrides(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    args = parser.parse_args(["--node-id", "1", "--data-dir", str(tmp_path),
                              "--peer-address", "2=127.0.0.1:19501",
                              "--peer-address", "3=127.0.0.1:19502"])
    from_flags = config_from_args(args).peer_addresses
    toml = tmp_path / "node.toml"
    toml.write_text('peer_addresses = { "2" = "127.0.0.1:19501", "3" = "127.0.0.1:19502" }\n')
    from_file = load_config(toml, {"node_id": 1, "data_dir": str(tmp_path)}).peer_addresses
    assert dict(from_flags) == dict(from_file) == {
        2: Address("127.0.0.1", 19501), 3: Address("127.0.0.1", 19502)
    }


@pytest.mark.parametrize("bad", [["2:127.0.0.1:1"], ["x=127.0.0.1:1"], ["2=nowhere"]])
def test_malformed_peer_addresses_are_config_errors(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, {"node_id": 1, "data_dir": str(tmp_path), "peer_addresses": bad})


def test_the_group_coordinators_append_linger_is_a_node_key(tmp_path: Path) -> None:
    base = {"node_id": 1, "data_dir": str(tmp_path)}
    assert load_config(None, base).group_coordinator_append_linger_ms == 8
    assert load_config(None, {**base, "group_coordinator_append_linger_ms": 0}).group_coordinator_append_linger_ms == 0
    with pytest.raises(ConfigError, match="group_coordinator_append_linger_ms"):
        load_config(None, {**base, "group_coordinator_append_linger_ms": -1})
