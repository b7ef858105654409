"""plot.py: runs' metrics.jsonl into one PNG."""

import json
import math

import pytest
from matplotlib.image import imread

from conftest import run_script


def write_run(run_dir, loss_scale: float, mfu: bool) -> None:
    """A run's metrics.jsonl as train.py writes it: messages, training and eval events."""
    run_dir.mkdir()
    events = [{"step": 0, "message": "0.05M parameters"}]
    for step in range(10, 210, 10):
        event = {
            "step": step,
            "tokens": step * 512,
            "train_loss": loss_scale * (1 + math.exp(-step / 50)),
            "lr": 1e-3 * min(1.0, step / 40),
            "grad_norm": 1 / math.sqrt(step),
            "tokens_per_sec": 20_000 + 100 * (step % 30),
            "step_time": 0.025,
        }
        if mfu:
            event["mfu"] = 0.4
        events.append(event)
        if step % 50 == 0:
            events.append({"step": step, "tokens": step * 512, "val_loss": event["train_loss"]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_two_runs_make_one_png(tmp_path):
    write_run(tmp_path / "small", 1.2, mfu=False)
    write_run(tmp_path / "large", 1.0, mfu=True)
    output = tmp_path / "compare.png"
    result = run_script(
        "plot.py",
        "small",
        str(tmp_path / "large" / "metrics.jsonl"),
        "--output",
        str(output),
        cwd=tmp_path,
    )
    assert f"wrote {output}" in result.stdout
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = imread(output).shape
    assert (width, height) == (1430, 935) and channels in (3, 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing"], "no metrics.jsonl in missing"),
        (["empty"], "has no training events yet"),
        (["empty", "--output", "runs.pdf"], "must end in .png"),
    ],
)
def test_bad_input_gets_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/metrics.jsonl").write_text('{"step": 0, "message": "starting"}\n')
    result = run_script("plot.py", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
