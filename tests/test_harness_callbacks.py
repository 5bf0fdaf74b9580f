"""The trainer's callbacks: the hooks run in the order dnr.harness.callbacks documents, and each callback
has done its job (evaluation, checkpoint, files) before the ones after it in the list see the epoch."""

import json
import os

from dnr.harness import fit, load_checkpoint, resolve_config
from dnr.harness import trainer
from dnr.harness.callbacks import Callback, CallbackList, ConsoleLines

# 128 examples / batch 64: 2 optimizer steps per epoch
TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=2, checkpoint_every=1)


def _recording_console(events):
    """ConsoleLines (the last callback of the trainer's list) that also records what it sees."""

    class Recorder(ConsoleLines):
        def on_run_start(self, run):
            events.append(("run_start", run.epoch, run.step, run.resumed))

        def on_epoch_start(self, run):
            events.append(("epoch_start", run.epoch, run.batch))

        def on_method_record(self, run, record):
            events.append(("method_record", run.epoch, run.step))
            super().on_method_record(run, record)

        def on_batch_end(self, run, stats):
            events.append(("batch_end", run.epoch, run.batch, run.step))

        def on_steps_end(self, run):
            events.append(("steps_end", run.epoch, run.step))

        def on_epoch_end(self, run, row):
            last = load_checkpoint(os.path.join(run.run_dir, "checkpoints", "last.pt"), kind="train")
            with open(os.path.join(run.run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            # the evaluation, the checkpoint and the metrics files came before the console
            events.append(("epoch_end", run.epoch, row["epoch"], row["test_clean_acc"] is not None,
                           (last["epoch"], last["batch"], last["step"]), last["metrics"][-1]["test_clean_acc"] is not None,
                           rows[-1]["test_clean_acc"] is not None, len(rows), run.rows[-1] is row))
            super().on_epoch_end(run, row)

        def on_run_end(self, run, summary):
            events.append(("run_end", run.step, os.path.exists(summary["model_path"]),
                           os.path.exists(os.path.join(run.run_dir, "summary.json"))))

    return Recorder


def test_the_trainer_calls_the_hooks_in_the_documented_order(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(trainer, "ConsoleLines", _recording_console(events))
    # rewire="paper": DNR rewires at the end of every epoch but the last (one method record, epoch 1)
    cfg = resolve_config(None, {}, dict(TINY, method="dnr", rewire="paper", density=0.2))
    fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    assert events == [
        ("run_start", 0, 0, False),
        ("epoch_start", 0, 0),
        ("batch_end", 0, 1, 1), ("batch_end", 0, 2, 2),
        ("steps_end", 0, 2),
        ("method_record", 0, 2),
        ("epoch_end", 1, 1, True, (1, 0, 2), True, True, 1, True),
        ("epoch_start", 1, 0),
        ("batch_end", 1, 1, 3), ("batch_end", 1, 2, 4),
        ("steps_end", 1, 4),
        ("epoch_end", 2, 2, True, (2, 0, 4), True, True, 2, True),
        ("run_end", 4, True, True),
    ]


def test_eval_every_leaves_the_test_columns_of_skipped_epochs_empty(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(trainer, "ConsoleLines", _recording_console(events))
    cfg = resolve_config(None, {}, dict(TINY, method="static", epochs=3, eval_every=2, density=0.2))
    fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    evaluated = [e[3] for e in events if e[0] == "epoch_end"]
    assert evaluated == [False, True, True]  # epoch 2 (every 2nd) and the last one


def test_callback_list_runs_every_hook_in_list_order():
    calls = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def __getattribute__(self, attr):
            if attr.startswith("on_"):
                return lambda *args: calls.append((object.__getattribute__(self, "name"), attr))
            return object.__getattribute__(self, attr)

    hooks = {"on_run_start": (None,), "on_epoch_start": (None,), "on_method_record": (None, {}),
             "on_batch_end": (None, {}), "on_steps_end": (None,), "on_epoch_end": (None, {}),
             "on_run_end": (None, {})}
    callbacks = CallbackList([Named("a"), Named("b")])
    for hook, args in hooks.items():
        getattr(callbacks, hook)(*args)
    assert calls == [(n, h) for h in hooks for n in ("a", "b")]
    # every hook of the base class is one the list forwards
    assert sorted(h for h in vars(Callback) if h.startswith("on_")) == sorted(hooks)



class _Accuracy(Callback):
    """A user callback: a column from the evaluated row, a key in the summary, and state rebuilt on resume."""

    def __init__(self):
        self.seen = []

    def on_run_start(self, run):
        self.seen = [r["epoch"] for r in run.rows]  # a resumed run's earlier epochs

    def on_epoch_end(self, run, row):
        self.seen.append(row["epoch"])
        row["clean_minus_pgd"] = row["test_clean_acc"] - row["test_pgd_acc"]  # evaluated before user callbacks

    def on_run_end(self, run, summary):
        summary["epochs_seen"] = list(self.seen)


def test_user_callbacks_see_the_evaluated_row_and_their_additions_are_saved(tmp_path):
    cb = _Accuracy()
    out = str(tmp_path / "run")
    summary = fit(resolve_config(None, {}, dict(TINY, method="static", density=0.5)), out, quiet=True,
                  progress=False, callbacks=[cb])
    assert summary["epochs_seen"] == [1, 2]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["clean_minus_pgd"] == r["test_clean_acc"] - r["test_pgd_acc"] for r in rows] == [True, True]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["epochs_seen"] == [1, 2]
    last = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"), kind="train")
    assert "clean_minus_pgd" in last["metrics"][-1]  # the checkpoint came after the callback


def test_a_callback_that_is_not_a_callback_is_refused_before_any_work(tmp_path):
    import pytest
    with pytest.raises(TypeError, match=r"fit: callbacks\[1\] is a function, expected a dnr.harness.callbacks.Callback"):
        fit(resolve_config(None, {}, TINY), str(tmp_path / "run"), quiet=True, progress=False,
            callbacks=[_Accuracy(), lambda run: None])
    assert not os.path.exists(tmp_path / "run")
