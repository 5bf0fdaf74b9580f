"""`dnr` command line: errors (one line, non-zero exit, nothing written), config files, --help, python -m dnr."""

import json
import shutil
import subprocess
import sys

import pytest

from dnr import cli
from dnr.harness.config import PRESETS, TrainConfig

def _dnr(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dnr", *args], capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, expected_code, *needles):
    """The error contract: exit code, one line on stderr starting with 'dnr: error: ', naming the needles."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dnr: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--density", "0"], ["--density", "0.0", "(0, 1]"]),
    (["--eps", "-0.1"], ["--eps", "-0.1", ">= 0"]),
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["--preset", "cifar11"], ["unknown preset 'cifar11'"]),
    (["--data-root", "/nonexistent/fmnist"], ["not found", "/nonexistent/fmnist"]),
    (["--model", "alexnet"], ["--model", "alexnet"]),
])
def test_bad_train_options_fail_before_any_work(args, needles, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = _main(capsys, "train", *args, "--out", str(out))
    _one_line_error(code, err, 1 if "--data-root" in args else 2, *needles)
    assert not out.exists()


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--learning-rate", "0.1"])
    assert info.value.code == 2 and "unrecognized arguments: --learning-rate" in capsys.readouterr().err


def test_config_file_with_flag_override(capsys, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 9, "lr": 0.01, "method": "static"}))
    code, stdout, _ = _main(capsys, "train", "--config", str(cfg), "--epochs", "3", "--dry-run")
    assert code == 0
    assert "  epochs: 3" in stdout and "  lr: 0.01" in stdout and "  method: static" in stdout
    cfg.write_text(json.dumps({"epochs": 9, "learning_rate": 0.01}))
    code, _, err = _main(capsys, "train", "--config", str(cfg), "--dry-run")
    _one_line_error(code, err, 2, "unknown option", "learning_rate")


def test_help_of_every_command_is_complete(capsys):
    for command in ("train", "eval", "report", "info"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: dnr " + command)
        if command == "train":
            for field in TrainConfig.__dataclass_fields__:
                assert "--" + field.replace("_", "-") in text, field
            for preset in PRESETS:
                assert preset in text
            for flag in ("--preset", "--config", "--out", "--resume", "--quiet", "--dry-run"):
                assert flag in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("train", "eval", "report", "info", "python -m dnr"))


def test_python_dash_m_dnr_is_the_dnr_command():
    a = _dnr("--version").stdout
    assert a.startswith("dnr ")
    exe = shutil.which("dnr")
    if exe is not None:
        assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout == a
