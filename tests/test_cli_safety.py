"""Nothing is lost and nothing ends in a traceback: commands never write over their inputs, a checkpoint or
a run file (and over other files only with --force), file-system errors are one line naming the target,
bad arguments fail before any work, damaged run files and malicious pickles get clear errors, and a run
survives a damaged last checkpoint or a crash before its first one (issue 12)."""

import errno
import json
import os
import pickle
import shutil
import sys
import warnings

import pytest
import torch

from dnr import cli
from dnr.harness import fit, load_checkpoint, resolve_config
from dnr.harness.checkpoint import CheckpointFallbackWarning, save_checkpoint
from dnr.harness.config import TrainConfig
from dnr.harness.builders import build_model_for
from test_cli import _one_line_error

TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=2, deterministic=True)


def _main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train_state(cfg, model, epoch, batch, step):
    return {"kind": "train", "config": cfg.to_dict(), "model": model.state_dict(), "epoch": epoch, "batch": batch,
            "step": step, "steps_per_epoch": 48}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as dnr train leaves it (config.json, model.pt, checkpoints/last.pt), without training."""
    cfg = TrainConfig(test_size=16, eval_steps=1).validate()
    model = build_model_for(cfg)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_checkpoint(str(run / "model.pt"), {"kind": "model", "config": cfg.to_dict(), "model": model.state_dict(),
                                            "summary": {"clean": 0.5, "pgd": 0.25}})
    save_checkpoint(str(run / "checkpoints" / "last.pt"), _train_state(cfg, model, 1, 12, 60))
    return run


def _snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in ("model.pt", "checkpoints/last.pt", "config.json")}


# ------------------------------------------------------------------------------ 1, 2: never overwrite data
@pytest.mark.parametrize("target", ["model.pt", "checkpoints/last.pt", "config.json", "summary.json"])
@pytest.mark.parametrize("command", ["export", "eval"])
def test_commands_refuse_to_write_over_checkpoints_and_run_files(run_dir, capsys, command, target):
    before = _snapshot(run_dir)
    out = run_dir / target
    argv = ["export", run_dir, "--format", "sparse", "--out", out] if command == "export" else [
        "eval", run_dir, "--test-size", "8", "--steps", "1", "--quiet", "--out", out]
    code, _, err = _main(capsys, *argv, "--force")  # --force does not unlock them
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "--out" in err and str(out) in err and "refusing" in err
    assert _snapshot(run_dir) == before
    assert not (run_dir / "summary.json").exists()


def test_a_symlink_or_hard_link_to_the_input_is_refused(run_dir, tmp_path, capsys):
    link, hard = tmp_path / "link.json", tmp_path / "hard.pt"
    link.symlink_to(run_dir / "model.pt")
    os.link(run_dir / "model.pt", hard)
    before = _snapshot(run_dir)
    for out in (link, hard):
        code, _, err = _main(capsys, "eval", run_dir / "model.pt", "--test-size", "8", "--quiet", "--out", out,
                             "--force")
        _one_line_error(code, err, 2, "--out", str(out), "refusing")
    # a copy of a checkpoint outside any run directory is recognised by its content
    copy = tmp_path / "copy.pt"
    shutil.copy(run_dir / "model.pt", copy)
    code, _, err = _main(capsys, "export", run_dir, "--format", "sparse", "--out", copy, "--force")
    assert code == 2 and "dnr checkpoint" in err
    assert _snapshot(run_dir) == before


def test_other_existing_files_need_force(run_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    out.write_text("keep me")
    code, _, err = _main(capsys, "eval", run_dir, "--test-size", "8", "--steps", "1", "--quiet", "--out", out)
    _one_line_error(code, err, 2, "--out", str(out), "--force")
    assert out.read_text() == "keep me"
    code, stdout, _ = _main(capsys, "eval", run_dir, "--test-size", "8", "--steps", "1", "--quiet", "--out", out,
                            "--force")
    assert code == 0 and json.loads(out.read_text()) == json.loads(stdout)


def test_train_json_is_checked_before_training(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text('{"epochs": 1}')
    run = tmp_path / "run"
    for json_out, needle in ((cfg_file, "input"), (tmp_path / "f" / "s.json", "not a folder"),
                             (run / "summary.json", "run directory")):
        if needle == "not a folder":
            (tmp_path / "f").write_text("a file")
        code, _, err = _main(capsys, "train", "--config", cfg_file, "--out", run, "--json", json_out, "--quiet")
        _one_line_error(code, err, 2, "--json", str(json_out), needle)
        assert not run.exists()  # refused before any work
    assert cfg_file.read_text() == '{"epochs": 1}'


def test_report_rewrites_its_own_report_but_never_a_checkpoint_behind_a_symlink(run_dir, capsys):
    (run_dir / "report.md").write_text("old report")
    code, _, err = _main(capsys, "report", run_dir)
    assert code == 0 and "old report" not in (run_dir / "report.md").read_text()  # its own product
    (run_dir / "report.md").unlink()
    (run_dir / "report.md").symlink_to(run_dir / "model.pt")
    before = _snapshot(run_dir)
    code, _, err = _main(capsys, "report", run_dir)
    _one_line_error(code, err, 2, "report.md", "model.pt", "refusing")
    assert _snapshot(run_dir) == before


# ------------------------------------------------------------------------------ 4: file-system errors
def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")  # what the zip writer does before the device fills, then it wraps the OSError
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed") from err

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not isinstance(v, bool)]
    code, _, err = _main(capsys, "train", "--out", run, "--quiet", "--no-plots", "--deterministic", *args)
    last = run / "checkpoints" / "last.pt"
    _one_line_error(code, err, 1, f"cannot write {str(last)!r}", "No space left on device", "ENOSPC")
    assert ".tmp" not in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(run), kind="train")["epoch"] == 1  # the epoch-1 checkpoint, intact
    assert sorted(os.listdir(run / "checkpoints")) == ["last.pt"]  # no temp file left


def test_out_under_a_regular_file_or_in_a_read_only_place(run_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["train", "--out", blocker / "run", "--epochs", "1"], ["train", "--out", blocker],
                 ["export", run_dir, "--format", "sparse", "--out", blocker / "m.safetensors"],
                 ["eval", run_dir, "--quiet", "--out", blocker / "sub" / "e.json"],
                 ["compare", "--config", tmp_path / "missing.yaml", "--out", blocker]):
        code, _, err = _main(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(blocker) in err, err
        assert "regular file" in err
    # a read-only file system: the guard asks the OS (access(2) reports EROFS) before any work
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, _, err = _main(capsys, "export", run_dir, "--format", "sparse", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "not writable" in err and "read-only" in err and str(tmp_path / "m.safetensors") in err


def test_a_write_error_names_the_target_not_the_temp_file(run_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(kwargs.get("dir", ""), ".m.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "m.safetensors"
    code, _, err = _main(capsys, "export", run_dir, "--format", "sparse", "--out", out)
    _one_line_error(code, err, 1, f"cannot write {str(out)!r}", "Read-only file system")
    assert ".tmp" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_export_into_proc_names_the_target(run_dir, capsys):
    code, _, err = _main(capsys, "export", run_dir, "--format", "sparse", "--out", "/proc/x")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "'/proc/x'" in err and ".tmp" not in err, err


# ------------------------------------------------------------------------------ 5, 6: resumable runs
def _state_dict(path):
    return load_checkpoint(str(path), kind="model")["model"]


def test_resume_after_a_crash_before_the_first_checkpoint_starts_afresh(tmp_path, capsys):
    cfg = resolve_config(None, {}, TINY)
    reference = fit(cfg, str(tmp_path / "ref"), quiet=True, progress=False)
    crashed = tmp_path / "crashed"  # what a crash before the first checkpoint leaves
    crashed.mkdir()
    (crashed / "config.json").write_text(json.dumps(cfg.to_dict()))
    code, _, err = _main(capsys, "train", "--out", crashed, "--quiet")
    _one_line_error(code, err, 1, "--resume")
    code, _, err = _main(capsys, "train", "--resume", crashed, "--quiet")
    assert code == 0, err
    assert err.strip() == (f"dnr: warning: run directory {str(crashed)!r} holds no checkpoint (the run stopped "
                           "before its first one): starting it afresh from its saved config.json")
    ref, got = _state_dict(reference["model_path"]), _state_dict(crashed / "model.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path):
    cfg = resolve_config(None, {}, TINY)
    run = tmp_path / "run"
    fit(cfg, str(run), quiet=True, progress=False)
    finished = _state_dict(run / "model.pt")
    last, previous = run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt"
    assert load_checkpoint(str(previous))["epoch"] == 1 and load_checkpoint(str(last))["epoch"] == 2
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a truncated last.pt
    with pytest.warns(CheckpointFallbackWarning, match=r"last\.pt.*truncated or corrupt.*previous\.pt"):
        fit(None, None, resume=str(run), quiet=True, progress=False)
    again = _state_dict(run / "model.pt")  # epoch 2 retrained from the epoch-1 checkpoint
    assert finished.keys() == again.keys() and all(torch.equal(finished[k], again[k]) for k in finished)
    assert load_checkpoint(str(last))["epoch"] == 2  # and the run's checkpoints are whole again


def test_resume_finds_previous_when_a_crash_came_between_the_two_renames(tmp_path, run_dir):
    last = run_dir / "checkpoints" / "last.pt"
    os.replace(last, run_dir / "checkpoints" / "previous.pt")
    with pytest.warns(CheckpointFallbackWarning, match="does not exist"):
        state = load_checkpoint(str(run_dir), kind="train")
    assert state["path"].endswith("previous.pt") and state["batch"] == 12


# ------------------------------------------------------------------------------ 7: validated before work
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_fails_the_dry_run(capsys, seed):
    code, _, err = _main(capsys, "train", "--seed", seed, "--dry-run")
    _one_line_error(code, err, 2, "--seed", seed, "4294967295")


@pytest.mark.parametrize("option, value", [("--eps", "nan"), ("--eps", "inf"), ("--alpha", "nan"),
                                           ("--alpha", "0"), ("--seed", "-1"), ("--steps", "0")])
def test_eval_arguments_fail_before_loading(capsys, tmp_path, option, value):
    # the checkpoint does not even exist: the bad argument is reported first
    code, _, err = _main(capsys, "eval", tmp_path / "missing.pt", option, value)
    _one_line_error(code, err, 2, f"option {option}: got", "expected")


def test_empty_config_and_duplicate_keys_are_errors(tmp_path, capsys):
    for name, text, needle in (("e.yaml", "# nothing\n", "is empty"), ("e.json", "", "is empty"),
                               ("d.yaml", "epochs: 1\nepochs: 3\n", "'epochs' is given twice"),
                               ("d.json", '{"epochs": 1, "epochs": 3}', "'epochs' is given twice")):
        (tmp_path / name).write_text(text)
        code, _, err = _main(capsys, "train", "--config", tmp_path / name, "--dry-run")
        _one_line_error(code, err, 2, str(tmp_path / name), needle)


# ------------------------------------------------------------------------------ 8: damaged run files
@pytest.mark.parametrize("name, text, needle", [("metrics.jsonl", '{"epoch": 1}\n{"epo', "line 2"),
                                                ("summary.json", "", "is empty")])
def test_report_on_damaged_run_files_names_the_file(run_dir, capsys, name, text, needle):
    (run_dir / name).write_text(text)
    code, _, err = _main(capsys, "report", run_dir)
    _one_line_error(code, err, 1, str(run_dir / name), needle)


# ------------------------------------------------------------------------------ 9: malicious pickles
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_a_malicious_pickle_is_refused_without_suggesting_the_unsafe_load(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dnr-checkpoint", "version": 1, "kind": "model", "model": _Payload()}, path)
    code, _, err = _main(capsys, "info", path)
    _one_line_error(code, err, 1, str(path), "holds Python objects that dnr will not unpickle")
    assert "weights_only=False" not in err and "truncated" not in err and "weights_only` set to `False" not in err


# ------------------------------------------------------------------------------ 10: smaller points
def test_info_counts_epochs_as_the_training_log_does(run_dir, capsys):
    code, stdout, _ = _main(capsys, "info", run_dir / "checkpoints" / "last.pt")
    assert code == 0 and "(train, epoch 2, batch 12/48, step 60)" in stdout  # the log's "epoch 2, batch 12/48"


def test_compact_export_of_an_irregular_model_names_the_incompatibility_without_safetensors(
        run_dir, tmp_path, capsys, monkeypatch):
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    code, _, err = _main(capsys, "export", run_dir, "--format", "compact", "--out", tmp_path / "m.pt2")
    assert code == 1 and "irregular" in err and "safetensors" not in err, err
