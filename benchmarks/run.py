"""``python -m benchmarks.run``: the performance table of issue 9, every figure a ratio measured in this run.

\b
    python -m benchmarks.run                      # everything (about 40 minutes on 2 CPU cores)
    python -m benchmarks.run --only averaging     # one or more of: overhead, utilisation, averaging, convergence, gpu

Prints one table (figure, measured, goal, met) and writes all numbers to ``--json`` (default
``benchmarks/results.json``) with the machine they were measured on.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from vitpeer.peer.core.options import setup_logging

BENCHES = ("overhead", "utilisation", "scaling", "averaging", "convergence", "gpu")


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": gpu,
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, goal, met) for every figure measured."""
    table: list[tuple[str, str, str, str]] = []

    def add(figure: str, value: float, shown: str, goal: str, met: Callable[[float], bool]) -> None:
        table.append((figure, shown, goal, "yes" if met(value) else "no"))

    for name, case in results.get("overhead", {}).items():
        speeds = f"{case['hivemind_samples_per_s']:.0f} / {case['lightning_samples_per_s']:.0f} samples/s"
        shown = f"{case['ratio']:.3f} ({speeds})"
        add(f"strategy overhead, {name}: hivemind / Lightning", case["ratio"], shown, ">= 0.97", lambda v: v >= 0.97)
    if "utilisation" in results:
        util = results["utilisation"]
        shown = f"{util['share']:.2f} ({util['seconds_per_swarm_step']:.2f} s per swarm step)"
        add("swarm utilisation, 2 peers: compute / wall", util["share"], shown, ">= 0.90", lambda v: v >= 0.90)
    for name, case in results.get("scaling", {}).items():
        one, two = case["one_peer"], case["two_peers"]
        shown = (
            f"{case['speedup']:.2f} ({two['swarm_samples_per_s']:.0f} / {one['swarm_samples_per_s']:.0f} samples/s; "
            f"accuracy {two['test_accuracy']:.3f} / {one['test_accuracy']:.3f})"
        )
        add(f"scaling, {name}: 2 peers / 1, a core each", case["speedup"], shown, ">= 1.8", lambda v: v >= 1.8)
    if "averaging" in results:
        avg = results["averaging"]
        for name, case in avg["compressions"].items():
            wire = case["wire_bytes_per_peer"] / 2**20
            shown = (
                f"{case['allreduce_s']:.2f} s ({case['vs_raw_tcp']:.1f} x raw TCP {avg['raw_tcp_s']:.2f} s; "
                f"{wire:.0f} MiB/peer on the wire; matchmaking {case['matchmaking_s']:.2f} s)"
            )
            if "p2p_relay_floor_s" in case:  # results from before the relay was measured lack it
                shown += f"; these bytes through the p2p daemons alone: {case['p2p_relay_floor_s']:.2f} s"
            if case["mean_abs_error"] > 0.01:  # unit-normal values: fp16 is off by ~1e-4
                shown = f"WRONG RESULT (mean error {case['mean_abs_error']:.2f} against the true mean); " + shown
            figure = f"all-reduce of 86.6M params, {name}"
            if name == "fp16":
                add(figure, case["allreduce_s"], shown, "<= 1.0 s", lambda v: v <= 1.0)
            else:
                table.append((figure, shown, "-", "-"))
    if "convergence" in results:
        conv = results["convergence"]
        one, two = conv["peers_1"]["test_accuracy"], conv["peers_2"]["test_accuracy"]
        shown = f"1 peer {one:.3f}, 2 peers {two:.3f} (gap {conv['gap_points']:.1f} points, {conv['samples']} samples)"
        ok = min(one, two) >= 0.97 and conv["gap_points"] <= 1.0
        table.append(("convergence, digits: 1 vs 2 peers", shown, ">= 0.97, within 1 point", "yes" if ok else "no"))
    if "gpu" in results:
        gpu = results["gpu"]
        for name, case in gpu["variants"].items():
            figure = f"GPU, {gpu['model']} bf16 batch {gpu['batch']} on {gpu['device']}: {name}"
            if case["mfu"] is None:  # a device whose peak we do not know
                table.append((figure, f"{case['samples_per_s']:.0f} samples/s; MFU unknown", ">= 40 % MFU", "-"))
            else:
                shown = f"MFU {case['mfu']:.1%} ({case['samples_per_s']:.0f} samples/s)"
                add(figure, case["mfu"], shown, ">= 40 % MFU", lambda v: v >= 0.40)
    elif not torch.cuda.is_available():
        table.append(("GPU: ViT-B/16 bf16 samples/s and MFU", "not measured: no GPU here", ">= 40 % MFU", "-"))
    return table


def print_table(table: list[tuple[str, str, str, str]]) -> None:
    header = ("figure", "measured", "goal", "met")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
    for row in [header, tuple("-" * width for width in widths), *table]:
        click.echo(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@click.command()
@click.option("--only", multiple=True, type=click.Choice(BENCHES), help="Run only these (repeat). [default: all]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default="benchmarks/results.json")
@click.option("--convergence-steps", type=int, default=600, show_default=True, help="Swarm steps of each run.")
def main(only: tuple[str, ...], json_path: Path, convergence_steps: int) -> None:
    """Measure, print the table, write the JSON."""
    setup_logging(verbose=False)
    chosen = only or BENCHES
    results: dict[str, Any] = {"machine": machine()}
    if "overhead" in chosen:
        from benchmarks import overhead

        results["overhead"] = overhead.run()
    if "utilisation" in chosen:
        from benchmarks import utilisation

        results["utilisation"] = utilisation.run()
    if "scaling" in chosen:
        from benchmarks import scaling

        results["scaling"] = {
            "diloco": scaling.run("digits_tiny_diloco"),
            "gradient": scaling.run("digits_tiny", 60),
        }
    if "averaging" in chosen:
        from benchmarks import averaging

        results["averaging"] = averaging.run()
    if "convergence" in chosen:
        from benchmarks import convergence

        results["convergence"] = convergence.run(convergence_steps)
    if "gpu" in chosen and torch.cuda.is_available():
        from benchmarks import gpu

        results["gpu"] = gpu.run()
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    click.echo(f"\nmeasured on {results['machine']}; all numbers in {json_path}\n")
    print_table(rows(results))


if __name__ == "__main__":
    main()
