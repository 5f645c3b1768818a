"""Every shipped config validates; bad values are refused with the key and the value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitpeer.peer.core.config import CONFIG_DIR, ConfigError, RunConfig, load_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_required_configs_ship():
    names = {path.stem for path in SHIPPED}
    assert {"digits_tiny", "cifar10_vit_b32_hivemind", "beans_vit_b16"} <= names
    assert {"cifar10_vit_b32_ddp", "cifar10_vit_b32_fsdp", "imagenet_vit_l16_ddp", "imagenet_vit_l16_fsdp"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_reference_experiment_values():
    cifar = load_config("cifar10_vit_b32_hivemind")
    assert cifar.model.name == "vit_base_patch32_224"
    assert cifar.data.source == "cifar10"
    assert cifar.data.batch_size == 320
    assert cifar.swarm.target_batch_size == 640
    for strategy in ("ddp", "fsdp"):  # lightning-hydra-timm: 4 nodes x 1 GPU x 320 images
        run = load_config(f"cifar10_vit_b32_{strategy}")
        assert (run.model.name, run.parallel.strategy, run.parallel.num_nodes, run.data.batch_size) == (
            "vit_base_patch32_224",
            strategy,
            4,
            320,
        )
        large = load_config(f"imagenet_vit_l16_{strategy}")  # the DDP vs ZeRO-3 comparison: 4 GPUs x 64 images
        assert (large.model.name, large.data.source, large.parallel.strategy, large.parallel.devices) == (
            "vit_large_patch16_224",
            "imagefolder",
            strategy,
            4,
        )
        assert large.data.batch_size == 64 and large.optim.weight_decay == 0.01


def test_single_strategy_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match="parallel.strategy = 'single' runs one process"):
        load_config("digits_tiny", {"parallel.devices": 2})


def test_command_line_overrides_file_and_file_overrides_defaults():
    config = load_config("digits_tiny", {"data.batch_size": 7})
    assert config.data.batch_size == 7
    assert config.model.img_size == 16  # from the file, not the default
    assert load_config().data.batch_size == RunConfig().data.batch_size


def test_unknown_key_is_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"data\.batch_sise: unknown key; did you mean 'batch_size'\?"):
        load_config(bad)


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError) as err:
        load_config("digits_tiny", {"data.batch_size": -4})
    assert "data.batch_size = -4" in str(err.value)
    assert "greater than 0" in str(err.value)


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cifar10, cifar100, imagefolder"):
        load_config(None, {"data.source": "mnist"})


def test_initial_peers_accepts_commas_and_rejects_non_multiaddrs():
    a = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH"
    b = "/ip4/10.0.0.2/tcp/31337/p2p/12D3KooWPTNKP3hSWvWP54hH9AGzu5mPA7wpXLpZc5PPnNGmwA2u"
    assert load_config(None, {"swarm.initial_peers": [f"{a},{b}"]}).swarm.initial_peers == [a, b]
    with pytest.raises(ConfigError, match="not a peer multiaddr"):
        load_config(None, {"swarm.initial_peers": ["10.0.0.1:31337"]})


@pytest.mark.parametrize(
    "addr, says",
    [
        ("/ip4/10.0.0.1/tcp/notaport/p2p/12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH", "protocol tcp"),
        ("/ip4/10.0.0.1/tcp/31337/p2p/QmA", "protocol p2p"),  # too short for a peer id
        ("/ip4/10.0.0.1/tcp/31337/p2p/Qm0OIl", "not a valid base58"),  # 0, O, I and l are not base58
        ("/ip4/10.0.0.300/tcp/31337/p2p/12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH", "protocol ip4"),
    ],
    ids=["port", "short-peer-id", "not-base58", "ip"],
)
def test_initial_peers_are_parsed_as_hivemind_parses_them(addr: str, says: str):
    with pytest.raises(ConfigError, match=says) as err:
        load_config(None, {"swarm.initial_peers": [addr]})
    assert str(err.value).startswith("swarm.initial_peers = ")


def test_invalid_yaml_names_the_file_line_and_column(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  batch_size: 32\n  augment: [true\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 4, column 1: not valid YAML"):
        load_config(broken)


def test_first_line_names_the_first_problem_and_the_rest_follow():
    with pytest.raises(ConfigError) as err:
        load_config("digits_tiny", {"data.batch_size": 0, "optim.lr": -1})
    first, *rest = str(err.value).splitlines()
    assert first.startswith("data.batch_size = 0: Input should be greater than 0 (") and first.endswith(".yaml)")
    assert [line.strip() for line in rest] == ["optim.lr = -1: Input should be greater than 0"]


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(ConfigError, match="digits_tiny"):
        load_config("no_such_experiment")


def test_resolved_config_round_trips(tmp_path: Path):
    config = load_config("digits_tiny", {"swarm.run_id": "roundtrip"})
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_8bit_compression_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"swarm.compression = '8bit': 8bit does not average correctly.*use fp16"):
        load_config("digits_tiny", {"swarm.compression": "8bit"})


def test_state_averaging_period_defaults_to_every_step_and_must_be_positive():
    assert load_config("digits_tiny").swarm.average_state_every == 1
    assert load_config("digits_tiny", {"swarm.average_state_every": 5}).swarm.average_state_every == 5
    with pytest.raises(ConfigError, match=r"swarm.average_state_every = 0: .*greater than 0"):
        load_config("digits_tiny", {"swarm.average_state_every": 0})
