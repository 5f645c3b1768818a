"""What every command line shares: flags generated from the typed config, one ``Error:`` line for bad input, and
the logging setup.

A flag that sets a config field is declared once, as a ``Flag`` naming the field's dotted key: its type, its choices
(a ``Literal``, or a registry's names in the field's ``choices``), ``--x/--no-x`` for a bool, its default and its help
(the field's docstring) all come from the field in ``core.config``. A flag left out keeps the config file's value:
command line > YAML file > defaults.

The peer's commands (``vitpeer.peer.commands.cli``), the coordinator's and the monitor's build on this module; it
imports no Lightning, timm or torch, so a refusal is printed before any of them loads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vitpeer.peer.core.config import ConfigError, RunConfig, load_config

DEFAULT_CONFIG = "digits_tiny"
"""What ``vitpeer train`` trains when no ``--config`` is given."""
DEMO_CONFIG = "digits_tiny_diloco"
"""What ``vitpeer demo``, ``vitpeer join`` and ``vitpeer coordinator`` run when no ``--config`` is given: digits_tiny
with the diloco algorithm, whose rounds make a second peer count."""
OUR_LOGGER = "vitpeer"  # our modules' log records are our progress lines, on stdout
COORDINATOR_TIMEOUT = 60.0
"""Default seconds of ``--coordinator-timeout``: how long join and monitor retry a coordinator that does not answer."""

FLAGS_OVER_FILE = (
    "Flags override the config file (--config): a flag left out keeps the file's value, and a key the file leaves "
    "out has the default shown."
)
"""The help's last paragraph for the commands whose flags set config fields (join, train)."""

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field; everything else about it is read from the field."""

    key: str
    """The field's dotted key in the command's config model: ``data.batch_size``."""
    name: str = ""
    """The flag without its dashes, when it is not the field's name: ``model`` for ``model.name``."""
    off: str = ""
    """A bool's negative flag without its dashes, when it is not ``no-NAME``."""
    metavar: str | None = None
    envvar: str | None = None
    show_default: bool = True
    """False where the field's default is not what the command does without the flag (the monitor's --run-id)."""

    @property
    def flag(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def param(self) -> str:
        """The keyword the command function receives."""
        return self.flag.replace("-", "_")


# --- the peer's flags: which config field each sets --------------------------------------------------------------

TRAINING_FLAGS = (  # what join and train share
    Flag("data.batch_size"),
    Flag("trainer.max_steps"),
    Flag("model.name", "model"),
    Flag("model.pretrained"),
    Flag("data.data_dir"),
    Flag("data.download"),
    Flag("trainer.precision"),
    Flag("trainer.accelerator"),
    Flag("trainer.threads"),
    Flag("trainer.output_dir"),
    Flag("trainer.resume"),
    Flag("trainer.seed"),
    Flag("optim.schedule"),
    Flag("trainer.accumulate_grad_batches"),
    Flag("trainer.save_top_k"),
    Flag("trainer.progress_bar"),
)
FSDP_FLAGS = (Flag("parallel.fsdp_sharding"), Flag("parallel.fsdp_min_params"))
INITIAL_PEERS = Flag("swarm.initial_peers", metavar="MADDR", envvar="VITPEER_INITIAL_PEERS")
JOIN_FLAGS = (
    INITIAL_PEERS,
    Flag("swarm.run_id"),
    Flag("swarm.host_port"),
    Flag("swarm.host_maddrs", "host-maddr", metavar="MADDR"),
    Flag("swarm.announce_ip"),
    Flag("swarm.identity_path", "identity"),
    Flag("swarm.client_mode"),
    Flag("swarm.use_auto_relay", "auto-relay"),
    Flag("swarm.algorithm"),
    Flag("swarm.target_batch_size"),
    Flag("swarm.outer_lr"),
    Flag("swarm.outer_momentum"),
    Flag("swarm.sync_every"),
    Flag("swarm.matchmaking_time"),
    Flag("swarm.averaging_timeout"),
    Flag("swarm.load_state_timeout"),
    Flag("swarm.compression"),
    Flag("swarm.aggregation"),
    Flag("swarm.local_updates"),
    Flag("swarm.overlap"),
    Flag("swarm.average_state_every"),
    Flag("parallel.strategy", "local-strategy"),
    Flag("parallel.devices"),
    *FSDP_FLAGS,
    *TRAINING_FLAGS,
    Flag("monitor.port", "metrics-port"),
    Flag("monitor.addr", "metrics-addr"),
)
TRAIN_FLAGS = (
    Flag("parallel.strategy"),
    Flag("parallel.devices"),
    Flag("parallel.num_nodes"),
    *FSDP_FLAGS,
    *TRAINING_FLAGS,
    Flag("trainer.early_stopping_patience"),
    Flag("trainer.load_best_at_end", off="last-at-end"),
)


# --- flags from fields ---------------------------------------------------------------------------------------------


def config_options(flags: Iterable[Flag], model: type[BaseModel] = RunConfig) -> Callable[[Command], Command]:
    """A decorator adding one click option per flag, in order, each built from its field of ``model``."""
    options = [flag_option(flag, config_field(model, flag.key)) for flag in flags]

    def add(command: Command) -> Command:
        for option in reversed(options):  # click lists the options in the order their decorators are written
            command = option(command)
        return command

    return add


def config_field(model: type[BaseModel], key: str) -> FieldInfo:
    """The field a dotted ``key`` names in ``model`` (``trainer.max_steps``: ``TrainerConfig.max_steps``)."""
    *sections, name = key.split(".")
    for section in sections:
        inner = model.model_fields[section].annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            raise KeyError(f"{key}: {model.__name__}.{section} is a value, not a section with fields")
        model = inner
    if name not in model.model_fields:
        raise KeyError(f"{key}: {model.__name__} has no field {name!r}; its fields: {', '.join(model.model_fields)}")
    return model.model_fields[name]


def flag_option(flag: Flag, field: FieldInfo) -> Callable[[Command], Command]:
    """The click option for ``flag``. Its default is None (an empty tuple when repeatable): a flag left out changes
    nothing, so the file's value stands; the help shows the field's own default."""
    kind = without_none(field.annotation)
    decls = [f"--{flag.flag}", flag.param]
    settings: dict[str, Any] = {"default": None, "metavar": flag.metavar, "envvar": flag.envvar}
    settings["show_envvar"] = flag.envvar is not None
    if kind is bool:
        decls[0] = f"--{flag.flag}/--{flag.off or 'no-' + flag.flag}"
    elif get_origin(kind) is Literal:
        settings["type"] = click.Choice([str(value) for value in get_args(kind)])
    elif isinstance(extra := field.json_schema_extra, dict) and isinstance(choices := extra.get("choices"), list):
        settings["type"] = click.Choice([str(value) for value in choices])  # a registry's names
    elif get_origin(kind) is list:
        settings["multiple"] = True
        settings["type"] = click_type(flag.key, get_args(kind)[0])
    else:
        settings["type"] = click_type(flag.key, kind)
    return click.option(*decls, help=flag_help(flag, field), **settings)


def without_none(annotation: Any) -> Any:
    """``int`` for ``int | None``: a flag that is not given is how the command line says None."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def click_type(key: str, kind: Any) -> Any:
    """What click converts the text of ``key``'s flag with; pydantic then checks the value against the field."""
    if kind is Path:
        return click.Path(path_type=Path)  # what it must be (a folder, a readable file) is preflight's to check
    if kind in (int, float, str):
        return kind
    raise TypeError(f"{key}: a field of type {kind} has no command-line form; set it in the config file")


def flag_help(flag: Flag, field: FieldInfo) -> str:
    """The field's docstring on one line, without reST's double backquotes, and its default. (pydantic reads the
    docstrings from the source; where there is none, the help is the default alone.)"""
    text = re.sub(r"``(.+?)``", r"\1", " ".join((field.description or "").split()))
    default = field.get_default(call_default_factory=True)
    if not flag.show_default or default is None or default == []:
        return text
    if isinstance(default, bool):
        default = flag.flag if default else flag.off or f"no-{flag.flag}"  # as click shows a bool's default
    return f"{text}  [default: {default}]".lstrip()  # set off as click sets off what it adds


def overrides(options: Mapping[str, Any], flags: Iterable[Flag]) -> dict[str, Any]:
    """The dotted config keys of the flags that were given, and their values (a repeated flag's as a list)."""
    given = {}
    for flag in flags:
        value = options.get(flag.param)
        if value is None or value == ():
            continue
        given[flag.key] = list(value) if isinstance(value, tuple) else value
    return given


def config_file_option(default: str) -> Callable[[Command], Command]:
    """``--config``, for the commands that build a run's config from a file and flags (join, train, coordinator);
    ``default`` is the config used without it (passed to ``build_config``: a coordinator's wins over join's)."""
    return click.option(
        "--config",
        "config_file",
        metavar="FILE",
        help=f"Experiment YAML: a path, or the name of a config in configs/.  [default: {default}]",
    )


coordinator_timeout_option = click.option(
    "--coordinator-timeout",
    type=click.FloatRange(min=0),
    default=COORDINATOR_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long to retry a coordinator that does not answer (it may be starting) before giving up.",
)
"""``--coordinator-timeout``, for every command that can start from ``--coordinator`` (join, monitor)."""


# --- bad input ---------------------------------------------------------------------------------------------------


class BadInput(click.ClickException):
    """What the user typed or pointed at is wrong: one line on stderr, exit code 2 (the world's failures exit 1)."""

    exit_code = 2


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Map what a command raises to its exit: a ``ConfigError`` from any depth (config, pre-flight, run) or a
    missing file is the user's input, exit 2; other ``ValueError`` and ``RuntimeError`` (peers or coordinator that do
    not answer, a daemon that does not start) are the world's, exit 1. Either way one ``Error:`` line, no traceback."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as err:
        raise BadInput(str(err)) from None
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None


def build_config(
    config_file: str | None,
    options: Mapping[str, Any],
    flags: Iterable[Flag],
    text: str | None = None,
    source: str = "",
    default: str = DEFAULT_CONFIG,
) -> RunConfig:
    """File values (or YAML ``text``) overridden by the ``flags`` that were given; a bad value exits naming the key,
    the value and the rule; ``default``: the config file when none is given."""
    given = overrides(options, flags)
    try:
        if text is not None:
            return load_config(None, given, text=text, source=source)
        return load_config(config_file or default, given)
    except ConfigError as err:
        raise BadInput(str(err)) from None


def join_config(
    config_file: str | None, coordinator: str | None, options: dict[str, Any], wait: float = COORDINATOR_TIMEOUT
) -> RunConfig:
    """The peer's config: from --config, or from the coordinator's /config (retried for ``wait`` s while it does
    not answer); initial peers from the coordinator unless --initial-peers is given."""
    if coordinator is None:
        return build_config(config_file, options, JOIN_FLAGS, default=DEMO_CONFIG)
    from vitpeer.peer.core.runtime.http import coordinator_get  # imports prometheus_client: only with a coordinator

    try:
        shared = coordinator_get(coordinator, "/config", wait=wait)
        if not options.get(INITIAL_PEERS.param):
            peers = coordinator_get(coordinator, "/initial-peers", wait=wait)
            options = {**options, INITIAL_PEERS.param: tuple(peers.split())}
    except ValueError as err:  # not an http:// address: the user's
        raise BadInput(str(err)) from None
    except RuntimeError as err:  # no answer, or an HTTP error: the coordinator's
        raise click.ClickException(str(err)) from None
    if config_file is None:
        return build_config(None, options, JOIN_FLAGS, text=shared, source=f"{coordinator}/config")
    config = build_config(config_file, options, JOIN_FLAGS, default=DEMO_CONFIG)
    theirs = load_config(None, text=shared, source=coordinator).swarm.run_id
    if config.swarm.run_id != theirs:
        raise BadInput(
            f"swarm.run_id = {config.swarm.run_id!r} but the coordinator runs {theirs!r}; "
            f"pass --run-id {theirs}, or leave out --config to use the coordinator's"
        )
    return config


# --- logging -----------------------------------------------------------------------------------------------------

LIBRARY_LOGGERS = ("hivemind", "pytorch_lightning", "lightning_fabric", "lightning.pytorch")
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    # a run that ends before its first validation has no val/loss yet: last.ckpt is written all the same
    r".*could not find the monitored key.*",
    # the run directory already holds config.yaml when the CSV logger opens it
    r".*Experiment logs directory .* exists and is not empty.*",
)


def quiet_warnings(verbose: bool, *, report: bool = False) -> None:
    """The libraries' Python warnings off (unless ``verbose``); with ``report``, UserWarnings too. It imports
    nothing: a command calls it first, before anything it validates with (a coordinator's answer) imports hivemind,
    whose imports already warn. ``setup_logging`` calls it again."""
    if verbose:
        return
    for category in (FutureWarning, DeprecationWarning, *((UserWarning,) if report else ())):
        warnings.filterwarnings("ignore", category=category)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def setup_logging(verbose: bool, *, report: bool = False) -> None:
    """Our progress lines on stdout; hivemind's and Lightning's records only when they warn, and their Python
    warnings not at all (everything with ``verbose``).

    Call it once the input is validated, right before the run: it imports hivemind and Lightning, whose imports set
    their loggers' levels, so ours must come after. ``report``: the command prints a report of its own (``vitpeer
    doctor``): no Lightning, no progress lines, hivemind silent unless ``verbose`` (its handler writes to stderr), no
    UserWarning either, and a hivemind that does not import is left for the report to tell."""
    quiet_warnings(verbose, report=report)
    # hivemind's "Task was destroyed but it is pending" at exit is asyncio noise, not a user's problem
    logging.getLogger("asyncio").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if report:
        try:
            import hivemind.utils.logging  # noqa: F401  sets its logger's level on import: set ours after
        except Exception:  # a broken install raises more than ImportError; the doctor's report says so
            return
        logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
        return
    import pytorch_lightning  # noqa: F401  its import sets its loggers to INFO: import it before setting them
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")  # hivemind's records go through the root logger's handler
    ours = logging.getLogger(OUR_LOGGER)
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s vitpeer %(message)s", datefmt="%H:%M:%S"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:  # hivemind's handler, moved to the root logger above
            handler.addFilter(one_line_library_errors)


def one_line_library_errors(record: logging.LogRecord) -> bool:
    """A library's error with a traceback becomes one line, the exception's type and message (``--verbose`` keeps the
    traceback). hivemind logs every averaging round that failed (a peer too slow, one that left) with its traceback,
    at ERROR: training goes on, and a volunteer reading a traceback believes their peer crashed."""
    if record.exc_info and record.exc_info[1] is not None and not record.name.startswith(OUR_LOGGER):
        error, message = record.exc_info[1], record.getMessage()
        detail = f"{type(error).__name__}: {error}"
        record.msg, record.args = detail if message == str(error) else f"{message} ({detail})", None
        record.exc_info, record.exc_text = None, None
    return True
