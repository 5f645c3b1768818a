"""``vitpeer status URL``: a coordinator's ``/status`` as a table in the terminal, the numbers its live page shows.

It imports neither torch nor hivemind (only the HTTP client of ``core.runtime.http``), so it answers in well under a
second.
Every string a peer reports (peer id, hardware, version) is untrusted: characters that are not printable (terminal
escape sequences among them) are shown as ``?`` and long values are cut.
"""

from __future__ import annotations

import json
from typing import Any

import click

from vitpeer.peer.core.runtime.http import coordinator_get

HARDWARE_WIDTH = 40
"""Characters of a peer's hardware string shown (a record may carry 256)."""


def printable(value: Any, width: int | None = None) -> str:
    """``value`` as one line of text a terminal only prints: control characters become ``?``; cut to ``width``."""
    text = "".join(char if char.isprintable() else "?" for char in str(value))
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def short_id(peer_id: Any) -> str:
    """A peer id's first and last six characters, as the live page shows it."""
    text = printable(peer_id)
    return f"{text[:6]}…{text[-6:]}" if len(text) > 14 else text


def number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "-"


def checkpoint_line(checkpoints: dict[str, Any]) -> str:
    best, newest = checkpoints.get("best"), checkpoints.get("newest")
    if not newest:
        return "checkpoints: none yet"
    line = f"checkpoints: newest at step {newest.get('swarm_epoch')}"
    if best:
        line += f"; best at step {best.get('swarm_epoch')}, val accuracy {number(best.get('val_accuracy'), 4)}"
        line += " (download: /best/model.safetensors, /best/config.json)"
    return line


def render(status: dict[str, Any], url: str) -> str:
    """The summary lines, then one row per alive peer (keyed by signer, as ``/status`` lists them)."""
    step, max_steps = status.get("swarm_epoch"), status.get("max_steps")
    lines = [
        f"run {printable(status.get('run_id'))} ({printable(status.get('algorithm'))}, "
        f"config {printable(status.get('config_hash'))}) at {url}",
        f"swarm step {step if step is not None else '-'} / {max_steps or '-'} | "
        f"{count(status.get('alive_peers'))} peers | {number(status.get('samples_per_second'), 1)} samples/s | "
        f"loss {number(status.get('loss'), 4)}",
        checkpoint_line(status.get("checkpoints") or {}),
        "",
    ]
    header = ("peer", "hardware", "step", "samples/s", "samples", "last seen", "version")
    rows = [
        (
            short_id(peer.get("peer_id")),
            printable(peer.get("hardware"), HARDWARE_WIDTH),
            count(peer.get("step")),
            number(peer.get("samples_per_second"), 1),
            count(peer.get("samples")),
            f"{number(peer.get('seconds_since_report'), 0)} s",
            printable(peer.get("version"), 16),
        )
        for peer in status.get("peers") or []
        if isinstance(peer, dict)
    ]
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    right = {2, 3, 4, 5}  # numbers line up on the right

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines += [line(header), *(line(row) for row in rows)]
    if not rows:
        lines.append("(no peer is training: nobody has joined, or their records expired)")
    return "\n".join(lines)


@click.command("status", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("url", metavar="URL")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying a coordinator that does not answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's /status as it came (JSON).")
def command(url: str, timeout: float, as_json: bool) -> None:
    """Show a coordinator's swarm: run, swarm step, throughput, loss, checkpoints and every alive peer.

    URL is the coordinator's HTTP address, the one volunteers join with. Its live page, at the same address in a
    browser, shows the same numbers with charts.

    \b
    Example: vitpeer status http://127.0.0.1:8470
    Example: vitpeer status http://203.0.113.5:8470 --json
    """
    try:
        text = coordinator_get(url, "status", wait=timeout)
    except (RuntimeError, ValueError) as err:  # coordinator_get's messages say what to do
        raise click.ClickException(str(err)) from None
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if not isinstance(status, dict) or "run_id" not in status:
        raise click.ClickException(f"{url} answered /status, but not as a vitpeer coordinator does; check the address")
    click.echo(text.rstrip() if as_json else render(status, url.rstrip("/")))
