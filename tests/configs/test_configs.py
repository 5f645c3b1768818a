"""Every shipped config validates; a config built on a base resolves to the values it stands for; bad values are
refused with the key and the value named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vitpeer.peer.core.config import CONFIG_DIR, ConfigError, RunConfig, load_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_required_configs_ship():
    names = {path.stem for path in SHIPPED}
    assert {"digits_tiny", "cifar10_vit_b32_hivemind", "beans_vit_b16"} <= names
    assert {"cifar10_vit_b32_ddp", "cifar10_vit_b32_fsdp", "imagenet_vit_l16_ddp", "imagenet_vit_l16_fsdp"} <= names
    assert {"cifar10_vit_b32", "imagenet_vit_l16"} <= names  # the two families' bases


# What the full files of the two families said before they became a base plus overrides (commit 83bffcc); every
# field not listed here was left at its default there.
CIFAR10_VIT_B32 = {
    "model.name": "vit_base_patch32_224",
    "model.pretrained": True,
    "data.source": "cifar10",
    "data.data_dir": Path("data/cifar10"),
    "data.batch_size": 320,
    "data.num_workers": 4,
    "optim.lr": 0.0001,
    "optim.weight_decay": 0.05,
    "optim.warmup_steps": 50,
    "optim.schedule": "cosine",
    "trainer.precision": "bf16-mixed",
}
IMAGENET_VIT_L16 = {
    "model.name": "vit_large_patch16_224",
    "model.pretrained": True,
    "data.source": "imagefolder",
    "data.data_dir": Path("data/imagenet"),
    "data.batch_size": 64,
    "data.num_workers": 8,
    "optim.lr": 0.0001,
    "optim.weight_decay": 0.01,
    "optim.warmup_steps": 500,
    "optim.schedule": "cosine",
    "trainer.max_steps": 8500,
    "trainer.precision": "bf16-mixed",
    "trainer.accelerator": "gpu",
}
BUILT_ON_A_BASE = {  # name: (its base, what its old full file said)
    "cifar10_vit_b32_ddp": (
        "cifar10_vit_b32",
        {
            **CIFAR10_VIT_B32,
            "parallel.strategy": "ddp",
            "parallel.devices": 1,
            "parallel.num_nodes": 4,
            "trainer.max_steps": 830,
            "trainer.accelerator": "gpu",
            "trainer.output_dir": Path("outputs/cifar10_vit_b32_ddp"),
        },
    ),
    "cifar10_vit_b32_fsdp": (
        "cifar10_vit_b32",
        {
            **CIFAR10_VIT_B32,
            "parallel.strategy": "fsdp",
            "parallel.devices": 1,
            "parallel.num_nodes": 4,
            "parallel.fsdp_sharding": "full_shard",
            "parallel.fsdp_min_params": 5_000_000,
            "trainer.max_steps": 830,
            "trainer.accelerator": "gpu",
            "trainer.output_dir": Path("outputs/cifar10_vit_b32_fsdp"),
        },
    ),
    "cifar10_vit_b32_hivemind": (
        "cifar10_vit_b32",
        {
            **CIFAR10_VIT_B32,
            "optim.warmup_steps": 5,
            "swarm.run_id": "vitpeer-cifar10-vit-b32",
            "swarm.algorithm": "diloco",  # the default; was gradient until 2026-12-07 (issue 28)
            "swarm.target_batch_size": 10240,
            "swarm.matchmaking_time": 5.0,
            "swarm.averaging_timeout": 60.0,
            "swarm.compression": "fp16",
            "trainer.max_steps": 125,
            "trainer.accelerator": "auto",
            "trainer.output_dir": Path("outputs/cifar10_vit_b32_hivemind"),
        },
    ),
    "imagenet_vit_l16_ddp": (
        "imagenet_vit_l16",
        {
            **IMAGENET_VIT_L16,
            "parallel.strategy": "ddp",
            "parallel.devices": 4,
            "trainer.output_dir": Path("outputs/imagenet_vit_l16_ddp"),
        },
    ),
    "imagenet_vit_l16_fsdp": (
        "imagenet_vit_l16",
        {
            **IMAGENET_VIT_L16,
            "parallel.strategy": "fsdp",
            "parallel.devices": 4,
            "parallel.fsdp_sharding": "full_shard",
            "parallel.fsdp_min_params": 5_000_000,
            "trainer.output_dir": Path("outputs/imagenet_vit_l16_fsdp"),
        },
    ),
}


def value_at(config: RunConfig, dotted: str) -> Any:
    section, field = dotted.split(".")
    return getattr(getattr(config, section), field)


@pytest.mark.parametrize("name", BUILT_ON_A_BASE)
def test_a_config_built_on_a_base_resolves_to_what_its_full_file_said(name: str):
    base, old = BUILT_ON_A_BASE[name]
    assert yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["base"] == base
    config = load_config(name)
    for dotted, value in old.items():
        assert value_at(config, dotted) == value, dotted
    assert config == load_config(None, old)  # and every field the old file did not set is at its default


def test_the_fields_that_tell_a_family_apart_come_from_the_overrides():
    ddp, fsdp, swarm = (load_config(f"cifar10_vit_b32_{kind}") for kind in ("ddp", "fsdp", "hivemind"))
    assert (ddp.parallel.strategy, fsdp.parallel.strategy, swarm.parallel.strategy) == ("ddp", "fsdp", "single")
    assert (ddp.trainer.max_steps, fsdp.trainer.max_steps, swarm.trainer.max_steps) == (830, 830, 125)
    assert (ddp.trainer.accelerator, fsdp.trainer.accelerator, swarm.trainer.accelerator) == ("gpu", "gpu", "auto")
    assert (ddp.swarm.target_batch_size, swarm.swarm.target_batch_size) == (256, 10240)  # the default, the swarm's
    # the default algorithm (diloco) sends fp16 pseudo-gradients; the swarm run says fp16 itself
    assert (ddp.swarm.algorithm, swarm.swarm.algorithm) == ("diloco", "diloco")
    assert (ddp.swarm.wire_compression, swarm.swarm.wire_compression) == ("fp16", "fp16")
    assert len({str(run.trainer.output_dir) for run in (ddp, fsdp, swarm, load_config("cifar10_vit_b32"))}) == 4
    large_ddp, large_fsdp = load_config("imagenet_vit_l16_ddp"), load_config("imagenet_vit_l16_fsdp")
    assert (large_ddp.parallel.strategy, large_fsdp.parallel.strategy) == ("ddp", "fsdp")
    assert large_ddp.parallel.devices == large_fsdp.parallel.devices == 4
    assert large_ddp.trainer.output_dir != large_fsdp.trainer.output_dir


def test_a_base_merges_mappings_key_by_key_and_replaces_other_values(tmp_path: Path):
    (tmp_path / "grand.yaml").write_text(
        "model:\n  kwargs: {depth: 6, embed_dim: 96}\nswarm:\n  host_maddrs: [/ip4/0.0.0.0/tcp/1]\n"
        "  target_batch_size: 64\ntrainer:\n  max_steps: 7\n"
    )
    (tmp_path / "parent.yaml").write_text("base: grand.yaml\nmodel:\n  kwargs: {depth: 2}\ntrainer:\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("base: parent\nswarm:\n  host_maddrs: [/ip4/0.0.0.0/tcp/2]\n")
    config = load_config(tmp_path / "child.yaml")  # the bases are found beside the file, with or without .yaml
    assert config.model.kwargs == {"depth": 2, "embed_dim": 96}  # a mapping merges at every depth
    assert config.swarm.host_maddrs == ["/ip4/0.0.0.0/tcp/2"]  # a list replaces the base's
    assert (config.swarm.target_batch_size, config.trainer.max_steps, config.trainer.seed) == (64, 7, 3)


def test_a_users_file_can_build_on_a_shipped_config_and_flags_still_win(tmp_path: Path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: cifar10_vit_b32_hivemind\nswarm:\n  run_id: my-cifar\ndata:\n  batch_size: 64\n")
    config = load_config(mine, {"data.batch_size": 16})
    assert (config.swarm.run_id, config.swarm.target_batch_size, config.data.batch_size) == ("my-cifar", 10240, 16)
    assert config.model.name == "vit_base_patch32_224"  # from the base's base


def test_the_saved_config_is_the_merged_one_without_its_base(tmp_path: Path):
    config = load_config("cifar10_vit_b32_fsdp")
    config.write_to(tmp_path)  # what `vitpeer train` and `vitpeer join` write into the run directory
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved
    assert saved["model"]["name"] == "vit_base_patch32_224" and saved["parallel"]["strategy"] == "fsdp"
    assert load_config(tmp_path / "config.yaml") == config


def test_an_unknown_base_names_the_file_the_key_and_a_close_match(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: cifar10_vit_b3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith("base = 'cifar10_vit_b3': config file 'cifar10_vit_b3' not found; ")
    assert "did you mean 'cifar10_vit_b32'?" in message and message.endswith(f"({bad})")


def test_a_cycle_of_bases_is_refused_with_the_files_in_it(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert (
        str(err.value) == f"base = 'a.yaml': the bases form a cycle, a.yaml -> b.yaml -> a.yaml ({tmp_path / 'b.yaml'})"
    )
    (tmp_path / "self.yaml").write_text("base: self\n")
    with pytest.raises(ConfigError, match=r"^base = 'self': the bases form a cycle, self\.yaml -> self\.yaml \("):
        load_config(tmp_path / "self.yaml")


def test_a_base_must_be_a_name_and_only_files_name_one(tmp_path: Path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("base: [digits_tiny]\n")
    with pytest.raises(ConfigError, match=r"^base = \['digits_tiny'\]: expected the name or path of a config file \("):
        load_config(listed)
    # YAML from a coordinator reads no file of this host
    with pytest.raises(
        ConfigError, match=r"^base = 'digits_tiny': only a config file can name a base \(http://c/config\)"
    ):
        load_config(None, text="base: digits_tiny\n", source="http://c/config")


def test_a_problem_in_a_base_names_the_base_file(tmp_path: Path):
    (tmp_path / "broken.yaml").write_text("data:\n  augment: [true\n")
    (tmp_path / "top.yaml").write_text("base: broken\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 3, column 1: not valid YAML"):
        load_config(tmp_path / "top.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_reference_experiment_values():
    cifar = load_config("cifar10_vit_b32_hivemind")
    assert cifar.model.name == "vit_base_patch32_224"
    assert cifar.data.source == "cifar10"
    assert cifar.data.batch_size == 320
    assert cifar.swarm.target_batch_size == 32 * cifar.data.batch_size  # 16 local steps each for two peers
    assert cifar.swarm.target_batch_size * cifar.trainer.max_steps == 640 * 2000  # the experiment's images
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


def test_compression_defaults_to_the_algorithm_s_and_8bit_is_accepted():
    """Unset, pseudo-gradients (diloco) travel in fp16 and gradients in fp32; 8bit is vitpeer's own codec now."""
    assert load_config("digits_tiny", {"swarm.algorithm": "diloco"}).swarm.wire_compression == "fp16"
    assert load_config("digits_tiny", {"swarm.algorithm": "gradient"}).swarm.wire_compression == "none"
    assert load_config("digits_tiny", {"swarm.compression": "8bit"}).swarm.wire_compression == "8bit"


def test_state_averaging_period_defaults_to_every_step_and_must_be_positive():
    assert load_config("digits_tiny").swarm.average_state_every == 1
    assert load_config("digits_tiny", {"swarm.average_state_every": 5}).swarm.average_state_every == 5
    with pytest.raises(ConfigError, match=r"swarm.average_state_every = 0: .*greater than 0"):
        load_config("digits_tiny", {"swarm.average_state_every": 0})
