"""The umbrella ``vitpeer`` command. Its subcommands live beside what they run and are found through the
``vitpeer.commands`` entry points of the installed distribution (``pyproject.toml``), loaded only when used: this
module imports none of them, so the layers below never import upwards."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import click

from vitpeer.peer.core.config.options import BadInput

ENTRY_POINTS = "vitpeer.commands"


class Commands(click.Group):
    """``vitpeer``'s group: subcommands from entry points, loaded on use; a flag click cannot parse (wrong type,
    unknown option) is one ``Error:`` line with exit code 2 as well, instead of click's usage banner."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(point.name for point in entry_points(group=ENTRY_POINTS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = entry_points(group=ENTRY_POINTS, name=cmd_name)
        return next(iter(found)).load() if found else None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # a bare group: click shows its help, keep that
                raise
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            raise BadInput(f"{err.format_message()} (see {where} --help)") from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="vitpeer")
def main() -> None:
    """vitpeer: train vision transformers together over the internet.

    \b
    Examples:
    Start a local two-peer demo:          vitpeer demo
    Start a swarm on this host:           vitpeer join --config cifar10_vit_b32_hivemind
    Join a swarm (paste the printed line): vitpeer join --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm...
    """


if __name__ == "__main__":
    main()
