"""Plot one or more runs' metrics.jsonl side by side into one PNG.

    python plot.py out/adder out/adder_wide --output adder.png
    python plot.py out/*/ --title "width sweep"

Panels, all against tokens trained: train and val loss, learning rate, throughput (tokens/s, with
the run's median MFU in the legend where it was logged) and gradient norm before clipping.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from gptlab.cli import ArgumentParser, check_output_file  # noqa: E402
from gptlab.errors import UserError, run_cli  # noqa: E402


def read_run(path: Path) -> list[dict]:
    """The events of a run directory (or of a metrics.jsonl file itself).

    A run that is being written may end in a half-written line: it is skipped with a warning.
    Any other line that is not an event is refused, naming the line.
    """
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise UserError(f"no metrics.jsonl in {path}; pass run directories written by train.py")
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(
            f"{metrics} is not UTF-8 text (byte {error.start}): it is not a metrics.jsonl "
            "written by train.py"
        ) from None
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            if number == len(lines):
                print(
                    f"warning: skipping the unfinished last line of {metrics} "
                    "(a run still writing it?)",
                    file=sys.stderr,
                )
                continue
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("tokens", 0), (int, float)):
            raise UserError(
                f"{metrics} line {number} is not an event of train.py: {line[:60]!r}; "
                "pass the metrics.jsonl of a run"
            )
        events.append(event)
    if not any("train_loss" in event for event in events):
        raise UserError(
            f"{metrics} has no training events yet; plot it once a few steps are logged"
        )
    return events


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two names are the same."""
    names = [(p.parent if p.is_file() else p).resolve().name for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


def series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(tokens, values) of every event that has `key`."""
    chosen = [e for e in events if key in e]
    return [e["tokens"] for e in chosen], [e[key] for e in chosen]


def plot_runs(runs: dict[str, list[dict]], output: Path, title: str) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    loss_ax, lr_ax, speed_ax, grad_ax = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, events) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        loss_ax.plot(*series(events, "train_loss"), color=color, lw=1.5)
        loss_ax.plot(*series(events, "val_loss"), color=color, ls="--", marker="o", ms=4)
        lr_ax.plot(*series(events, "lr"), color=color, label=label)
        mfu = series(events, "mfu")[1]
        speed_label = f"{label} (median MFU {statistics.median(mfu):.1%})" if mfu else label
        speed_ax.plot(*series(events, "tokens_per_sec"), color=color, label=speed_label)
        grad_ax.plot(*series(events, "grad_norm"), color=color, label=label)

    # The loss legend names the runs by colour and the curves by line style.
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(runs))]
    handles += [
        Line2D([], [], color="gray", lw=1.5),
        Line2D([], [], color="gray", ls="--", marker="o", ms=4),
    ]
    loss_ax.legend(handles, [*runs, "train (mean since last log)", "val (fixed subset)"])
    loss_ax.set(title="Loss", ylabel="cross-entropy per token (nats)")
    lr_ax.set(title="Learning rate", ylabel="learning rate")
    speed_ax.set(title="Throughput (all processes)", ylabel="tokens / s")
    speed_ax.set_ylim(bottom=0)
    speed_ax.yaxis.set_major_formatter(EngFormatter())
    grad_ax.set(title="Gradient norm before clipping", ylabel="global L2 norm")
    for ax in (lr_ax, speed_ax, grad_ax):
        ax.legend(fontsize="small")
    for ax in axes.flat:
        ax.set_xlabel("tokens trained")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize="x-large")
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="plot.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl)")
    parser.add_argument("--output", type=Path, default=Path("runs.png"), help="PNG to write")
    parser.add_argument("--title", help="figure title (default: the run names)")
    args = parser.parse_args(argv)
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output {args.output} must end in .png")
    check_output_file(args.output)
    labels = run_labels(args.runs)
    runs = {label: read_run(path) for label, path in zip(labels, args.runs)}
    try:
        plot_runs(runs, args.output, args.title or " vs ".join(labels))
    except OSError as error:
        raise UserError(f"could not write {args.output} ({error.strerror})") from None
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
