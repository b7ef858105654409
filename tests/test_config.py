import json

import pytest

from conftest import REPO, run_script
from gptlab.config import Config, build, help_text, load_config, parse_overrides
from gptlab.errors import UserError


def test_defaults_from_file_and_command_line_overrides(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"model": {"n_layer": 3}, "max_steps": 10, "lr": {"peak": 0.01}}))
    config, name, _ = load_config(
        ["--config", str(path), "--model.n_layer=5", "--batch_size", "7", "--compile"]
    )
    assert name == "mine"
    assert config.model.n_layer == 5 and config.batch_size == 7 and config.compile is True
    assert config.lr.peak == 0.01 and config.model.n_head == Config().model.n_head
    assert config.out_dir == "out/mine"
    config, _, _ = load_config(["--config", str(path), "--out_dir=/somewhere", "--lr.end=null"])
    assert config.out_dir == "/somewhere" and config.lr.end is None


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").glob("*.json"))
    assert configs
    for path in configs:
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"model": {"n_layers": 2}},
            "unknown config key 'model.n_layers'; did you mean 'model.n_layer'?",
        ),
        ({"batchsize": 2}, "did you mean 'batch_size'?"),
        ({"model": {"n_layer": "two"}}, "config key 'model.n_layer' must be int, got \"two\""),
        ({"model": {"n_layer": 2.5}}, "must be int"),
        ({"compile": 1}, "config key 'compile' must be bool"),
        ({"model": 3}, "config key 'model' must be an object"),
    ],
)
def test_bad_keys_and_types_are_refused_with_a_suggestion(values, message):
    with pytest.raises(UserError, match=None) as error:
        build(Config, values)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_layr=2"], "unknown option --model.n_layr; did you mean 'model.n_layer'?"),
        (["--batch_size=many"], "--batch_size=many: expected int"),
        (["--model=3"], "is a group"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_command_line_options(args, message):
    with pytest.raises(UserError) as error:
        parse_overrides(args)
    assert message in str(error.value)


def test_cross_field_problems_are_reported_together():
    with pytest.raises(UserError) as error:
        load_config(["--max_steps=0", "--lr.warmup=1.5", "--mixed_precision=fp8"])
    text = str(error.value)
    assert "max_steps" in text and "lr.warmup" in text and "mixed_precision" in text
    assert "\n" not in text


def test_help_lists_every_key_with_its_documentation():
    text = help_text()
    assert "--model.n_layer=6  Number of transformer blocks." in text
    assert "--lr.warmup=0.0" in text and "--early_stop.patience=0" in text


def test_train_reports_a_typo_in_one_line_with_exit_code_2(tmp_path):
    result = run_script(
        "train.py",
        "--config",
        str(REPO / "configs/adder.json"),
        "--model.n_layers=2",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown option --model.n_layers; did you mean 'model.n_layer'?"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written
