"""The compression-method interface: the registry, and a user's method (random re-masking, a toy) that
is registered by a plugin module and trained through ``dnr.harness.fit`` and ``dnr train --plugin``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import dnr.methods as methods
from dnr.harness import ConfigError, fit, load_checkpoint, resolve_config
from dnr.harness.builders import build_model_for
from dnr.nn import masked_layers

TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=3, density=0.2)

# A user's compression method: a random mask with the layers' counts, re-drawn at every epoch end.
PLUGIN = textwrap.dedent('''
    import torch
    import dnr.methods as M

    @M.register("toy-remask", replace=True)
    class RandomRemask(M.MaskedMethod):
        description = "toy: random mask, re-drawn at every epoch end"
        options = {"every": 1}  # re-draw at the end of every N-th epoch (--method-options every=N)

        def __init__(self, cfg):
            super().__init__(cfg)
            self.history = []

        def attach(self, model, optimizer, *, total_steps, steps_per_epoch):
            super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
            self.keep_masks(model, optimizer)

        def epoch_end(self, epoch, *, last):
            if (epoch + 1) % self.option("every"):
                return None
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            moved = 0
            for name, layer in M.base.masked_layers(self.model):
                old = layer.mask.clone()
                flat = old.flatten()
                layer.mask.copy_(flat[torch.randperm(flat.numel(), generator=g)].view_as(old))
                moved += int((old != layer.mask).sum()) // 2
            M.base.apply_masks(self.model)
            record = {"epoch": epoch + 1, "moved": moved}
            self.history.append(record)
            return record

        def epoch_message(self, record):
            return f"toy-remask: epoch {record['epoch']} moved {record['moved']} weights"

        def log_records(self):
            return {"remask.jsonl": self.history}

        def state_dict(self):
            return {"history": list(self.history)}

        def load_state_dict(self, state):
            self.history = list(state["history"])
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module ``toy_remask_plugin`` importable from a fresh folder on sys.path."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_remask_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("toy_remask_plugin", None)
    yield folder
    sys.modules.pop("toy_remask_plugin", None)


def test_the_builtin_methods_are_registered_in_order():
    assert methods.available()[:7] == ("dense", "dense-at", "static", "dnr", "oneshot", "admm", "rsr")
    assert methods.get("dnr").sparse and methods.get("oneshot").phased and not methods.get("dense").adversarial
    with pytest.raises(methods.UnknownMethodError, match="unknown compression method 'nope'; registered: dense"):
        methods.get("nope")


def test_register_refuses_a_second_method_of_a_name_and_a_non_method():
    class Other(methods.CompressionMethod):
        pass

    with pytest.raises(ValueError, match="'dnr' is already registered"):
        methods.register("dnr", Other)
    with pytest.raises(TypeError, match="CompressionMethod subclass"):
        methods.register("thing", object)
    with pytest.raises(ValueError, match="name must be letters"):
        methods.register("a b", Other)
    assert methods.get("dnr").__name__ == "DynamicRewiring"


def test_a_plugin_method_trains_through_fit(tmp_path, plugin):
    cfg = resolve_config(None, {}, {**TINY, "method": "toy-remask", "plugin": ["toy_remask_plugin"]})
    assert cfg.sparse and not cfg.phased
    initial = build_model_for(cfg)
    s = fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    assert s["method"] == "toy-remask"
    final = load_checkpoint(s["model_path"])["model"]
    names = [n for n, _ in masked_layers(initial)]
    # the budget of every layer is kept and the masks moved (the method's epoch ends ran)
    for name, layer in masked_layers(initial):
        assert int(final[name + ".mask"].sum()) == int(layer.mask.sum()), name
    assert any(not torch.equal(final[n + ".mask"], l.mask) for n, l in masked_layers(initial))
    assert all(torch.equal(final[n + ".weight"][final[n + ".mask"] == 0], torch.zeros(())
                           .expand(int((final[n + ".mask"] == 0).sum()))) for n in names)
    records = [json.loads(line) for line in open(os.path.join(s["run_dir"], "remask.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["moved"] > 0 for r in records)
    saved = json.load(open(os.path.join(s["run_dir"], "config.json")))
    assert (saved["method"], saved["plugin"]) == ("toy-remask", ["toy_remask_plugin"])
    last = load_checkpoint(os.path.join(s["run_dir"], "checkpoints", "last.pt"))
    assert last["method"] == {"history": records}
    # dnr compare's reuse check in a fresh worker process, where only the saved config names the plugin
    code = ("import json, sys; from dnr.harness.compare import cell_state; "
            "print(cell_state(sys.argv[1], json.load(open(sys.argv[1] + '/config.json'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, s["run_dir"]], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.stdout.strip() == "done", proc.stderr


def _dnr(args, plugin_dir, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dnr", *args], capture_output=True, text=True, timeout=240,
                          env=env, cwd=cwd)


def test_a_plugin_method_trains_through_the_cli(tmp_path, plugin):
    out = tmp_path / "cli-run"
    proc = _dnr(["train", "--method", "toy-remask", "--plugin", "toy_remask_plugin", "--out", str(out),
                 "--epochs", "2", "--train-size", "128", "--test-size", "32", "--batch-size", "64",
                 "--attack-steps", "1", "--eval-steps", "1", "--eval-size", "16", "--density", "0.2",
                 "--threads", "1", "--no-plots", "--no-progress"], plugin, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "toy-remask: epoch 1 moved" in proc.stdout
    assert json.load(open(out / "summary.json"))["method"] == "toy-remask"
    assert len(open(out / "remask.jsonl").read().splitlines()) == 2
    helped = _dnr(["train", "--plugin", "toy_remask_plugin", "--help"], plugin, tmp_path)
    # argparse wraps lines (at hyphens too): compare without whitespace
    assert helped.returncode == 0 and "toy-remask:toy:randommask" in "".join(helped.stdout.split())


def test_help_lists_the_builtin_methods(tmp_path, capsys):
    from dnr import cli
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())
    for name in methods.available():
        assert "".join(f"{name}: {methods.get(name).description}".split()) in text


def test_unknown_method_and_bad_plugin_are_one_line_errors(tmp_path, capsys):
    from dnr import cli
    assert cli.main(["train", "--method", "nope", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dnr: error: option --method: got 'nope', expected one of ['dense'") and "\n" not in err
    assert cli.main(["train", "--plugin", "no_such_module_xyz", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dnr: error: option --plugin: cannot import plugin module 'no_such_module_xyz'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="option --method"):
        resolve_config(None, {}, {"method": "nope"})


def test_method_options_reach_the_method(tmp_path, plugin):
    cfg = resolve_config(None, {}, dict(TINY, plugin=["toy_remask_plugin"], method="toy-remask",
                                        method_options=["every=2"]))
    assert cfg.method_settings == {"every": 2} and methods.create(cfg).option("every") == 2
    assert resolve_config(None, {}, dict(TINY, plugin=["toy_remask_plugin"], method="toy-remask")).method_settings \
        == {"every": 1}  # the declared default
    fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    with open(tmp_path / "run" / "remask.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [2]  # epoch 1 skipped: every=2


@pytest.mark.parametrize("given, words", [
    (["every"], "got 'every', expected KEY=VALUE"),
    (["often=2"], "got 'often', expected an option of method 'toy-remask' (every)"),
    (["every=two"], "option --method-options every: got 'two', expected an integer"),
    (["every=2", "every=3"], "'every' is given twice"),
])
def test_bad_method_options_are_one_line_errors(plugin, given, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        resolve_config(None, {}, dict(TINY, plugin=["toy_remask_plugin"], method="toy-remask", method_options=given))


def test_method_options_on_a_method_without_options_is_refused_from_the_cli(tmp_path, capsys):
    from dnr import cli
    assert cli.main(["train", "--method", "dnr", "--method-options", "foo=1", "--out", str(tmp_path / "a"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dnr: error: option --method-options: got 'foo', expected an option of method 'dnr' (none)"
    assert not (tmp_path / "a").exists()
