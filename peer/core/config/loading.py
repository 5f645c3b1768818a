"""The whole run configuration (``RunConfig``) and loading it: a data-only YAML file from ``configs/`` with its
bases, dotted overrides (``{"data.batch_size": 64}``), and errors that name the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from vitpeer.peer.core.config.sections import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ParallelConfig,
    Section,
    TrainerConfig,
)
from vitpeer.peer.core.config.swarm import SwarmConfig

CONFIG_DIR = Path(str(files("vitpeer.configs")))
"""Where the experiment files ship (``vitpeer.configs``' package data); ``--config NAME`` without a path looks here."""


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML (loadable again with ``load_config``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())

    def write_to(self, run_dir: Path) -> None:
        """The run directory's ``config.yaml`` (``--config`` takes it back) and ``config.json`` (for tools)."""
        self.save(run_dir / "config.yaml")
        (run_dir / "config.json").write_text(self.model_dump_json(indent=2) + "\n")

    def for_peers(self) -> RunConfig:
        """What every peer of the run shares: this config without this host's addresses, identity and paths."""
        host_specific = {"initial_peers", "host_port", "host_maddrs", "announce_ip", "announce_maddrs"}
        host_specific |= {"identity_path", "client_mode", "use_auto_relay"}
        swarm = SwarmConfig(**self.swarm.model_dump(exclude=host_specific))
        trainer = TrainerConfig(**self.trainer.model_dump(exclude={"output_dir", "resume", "accelerator"}))
        local = {"monitor": MonitorConfig(), "parallel": ParallelConfig()}  # this host's exporter and devices
        return self.model_copy(update={"swarm": swarm, "trainer": trainer, **local})


def resolve_config_path(name: str | Path, beside: Path | None = None) -> Path:
    """A path as given, or a file of ``configs/`` named with or without ``.yaml``. ``beside``: the folder of the file
    whose ``base:`` this is, looked in first instead of the working directory (a base next to its file is found
    wherever the command runs)."""
    path = Path(name)
    first = [beside / path, beside / f"{path}.yaml"] if beside is not None else [path]
    for candidate in (*first, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name), shipped, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"config file {str(name)!r} not found; {hint}shipped configs: {', '.join(shipped)}")


def _read_with_bases(text: str, source: str, beside: Path | None, below: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping ``text`` (read from ``source``) over its ``base:`` file, and that one's over its own: mappings
    merge key by key at every depth, any other value (a list, a number, a string) replaces the base's. ``beside``:
    the folder of the file; None (YAML from the network) may name no base. ``below``: the files that named this one."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    if "base" not in data:
        return data
    name = data.pop("base")
    if beside is None:  # a config from a coordinator reads no file of this host
        raise ConfigError(f"base = {name!r}: only a config file can name a base ({source})")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"base = {name!r}: expected the name or path of a config file ({source})")
    try:
        path = resolve_config_path(name, beside)
    except ConfigError as err:
        raise ConfigError(f"base = {name!r}: {err} ({source})") from None
    chain = (*below, Path(source).resolve())
    if path.resolve() in chain:
        cycle = " -> ".join(file.name for file in (*chain, path.resolve()))
        raise ConfigError(f"base = {name!r}: the bases form a cycle, {cycle} ({source})")
    merged = _read_with_bases(path.read_text(), str(path), path.parent, chain)
    pending = [(merged, data)]
    while pending:
        under, over = pending.pop()
        for key, value in over.items():
            if isinstance(under.get(key), dict) and isinstance(value, dict):
                pending.append((under[key], value))
            else:
                under[key] = value
    return merged


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    text: str | None = None,
    source: str = "",
) -> RunConfig:
    """Validate YAML (a file ``path``, or ``text`` read from ``source``) with dotted ``overrides`` applied on top.

    A file may start from another: ``base: NAME`` (a shipped config's name, or a path relative to the file) merges
    the file over that one before validation, the way ``cifar10_vit_b32_ddp`` builds on ``cifar10_vit_b32``; bases
    may have bases. The result, with no ``base`` left, is what a run saves as its ``config.yaml``. Neither ``path``
    nor ``text``: the defaults. Raises ConfigError naming the key, the value and the rule (and the file).
    """
    beside = None
    if path is not None:
        resolved = resolve_config_path(path)
        text, source, beside = resolved.read_text(), str(resolved), resolved.parent
    source = source or "defaults"
    data = _read_with_bases(text or "", source, beside)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validated(RunConfig, data, source)


def validated(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """``model`` built from ``data``, or a ConfigError with one line per problem (key = value: rule), the first
    naming the first problem and ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            shown = "" if problem["type"] in ("missing", "extra_forbidden") else f" = {problem.get('input')!r}"
            rule = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                rule = _unknown_key(model, problem["loc"])
            lines.append(f"{key}{shown}: {rule}")
        raise ConfigError(f"{lines[0]} ({source})" + "".join(f"\n  {line}" for line in lines[1:])) from None


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'unknown key', with the close matches among the keys its section takes."""
    section = model
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        section = field.annotation if field is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return "unknown key"
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}known: {', '.join(known)}"
