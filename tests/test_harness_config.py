"""TrainConfig: presets, resolution order (preset < file < flags), validation messages, LR schedules."""

import argparse
import json
import math

import pytest

from dnr.harness.config import (DEFAULT_PRESET, PRESETS, ConfigError, TrainConfig, add_config_arguments,
                                config_overrides_from_args, load_config_file, resolve_config)
from dnr.harness.builders import lr_factor


def test_default_preset_is_the_quick_fashion_mnist_dnr_run():
    cfg = resolve_config()
    assert DEFAULT_PRESET == "fashion-mnist-quick"
    assert (cfg.dataset, cfg.model, cfg.method, cfg.mode, cfg.density) == ("fashion-mnist", "small_cnn", "dnr",
                                                                          "irregular", 0.05)
    assert (cfg.eps, cfg.alpha, cfg.attack_steps, cfg.eval_steps) == (0.1, 0.025, 5, 20)


@pytest.mark.parametrize("name", ["cifar10-vgg16-irregular", "cifar10-resnet18-channel", "cifar100-vgg16-channel",
                                  "cifar100-resnet18-irregular", "tiny-imagenet-vgg16-irregular",
                                  "tiny-imagenet-vgg16-channel"])
def test_paper_presets_hold_the_paper_settings(name):
    cfg = resolve_config(name)
    data, model, mode = name.rsplit("-", 2)
    assert (cfg.dataset, cfg.model, cfg.mode) == (data, model, mode)
    assert (cfg.method, cfg.density, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        "dnr", 0.05, 200, 128, 0.1, 5e-4)
    assert (cfg.eps, cfg.alpha, cfg.attack_steps, cfg.beta) == (8 / 255, 2 / 255, 7, 0.5)


def test_preset_list_covers_every_paper_setting():
    expected = {f"{d}-{m}-{u}" for d in ("cifar10", "cifar100") for m in ("vgg16", "resnet18")
                for u in ("irregular", "channel")} | {"tiny-imagenet-vgg16-irregular", "tiny-imagenet-vgg16-channel"}
    cap = {"fashion-mnist-small_cnn-cap", "cifar10-vgg16-cap", "cifar10-resnet18-cap"}  # CaP (dnr.methods.cap)
    circulant = {"fashion-mnist-circulant", "cifar10-vgg16-circulant", "cifar10-resnet18-circulant"}  # issue 16
    assert set(PRESETS) == expected | {"fashion-mnist-quick"} | cap | circulant


@pytest.mark.parametrize("name,model,flops", [("fashion-mnist-small_cnn-cap", "small_cnn", 0.5),
                                              ("cifar10-vgg16-cap", "vgg16", 0.25),
                                              ("cifar10-resnet18-cap", "resnet18", 0.25)])
def test_cap_presets(name, model, flops):
    cfg = resolve_config(name)
    assert (cfg.method, cfg.model, cfg.cap_flops, cfg.phased) == ("cap", model, flops, True)
    if name.startswith("cifar10"):  # the paper's training settings
        assert (cfg.epochs, cfg.eps, cfg.attack_steps) == (200, 8 / 255, 7)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_overrides_preset_and_flags_override_file(tmp_path, suffix):
    if suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        text = yaml.safe_dump({"preset": "cifar10-vgg16-channel", "epochs": 7, "lr": 0.2, "lr-schedule": "cosine"})
    else:
        text = json.dumps({"preset": "cifar10-vgg16-channel", "epochs": 7, "lr": 0.2, "lr-schedule": "cosine"})
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = resolve_config(None, load_config_file(str(path)), {"epochs": 3})
    assert (cfg.model, cfg.mode, cfg.lr, cfg.lr_schedule, cfg.epochs) == ("vgg16", "channel", 0.2, "cosine", 3)
    assert cfg.eps == 8 / 255  # untouched preset value


def test_cli_flags_only_override_what_is_given():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--density", "0.1", "--no-nesterov", "--lr-milestones", "0.3", "0.6",
                              "--rewire-every", "none"])
    assert config_overrides_from_args(args) == {"density": 0.1, "nesterov": False, "lr_milestones": [0.3, 0.6],
                                                "rewire_every": None}
    cfg = resolve_config(None, {}, config_overrides_from_args(args))
    assert (cfg.density, cfg.nesterov, cfg.lr_milestones, cfg.epochs) == (0.1, False, [0.3, 0.6],
                                                                           PRESETS[DEFAULT_PRESET]["epochs"])


@pytest.mark.parametrize("overrides, flag", [
    ({"density": 0}, "--density"), ({"density": 1.5}, "--density"), ({"eps": -0.1}, "--eps"),
    ({"batch_size": 0}, "--batch-size"), ({"epochs": 0}, "--epochs"), ({"alpha": 0}, "--alpha"),
    ({"beta": 2}, "--beta"), ({"lr": "fast"}, "--lr"), ({"method": "magic"}, "--method"),
    ({"batch_size": 1.5}, "--batch-size"), ({"momentum": 0}, "--momentum"), ({"nesterov": "maybe"}, "--nesterov"),
    ({"warmup_epochs": 10, "epochs": 5}, "--warmup-epochs"), ({"lr_milestones": [1.5]}, "--lr-milestones"),
    ({"eps": math.nan}, "--eps"), ({"device": "tpu"}, "--device"),
    ({"sparsify_until": 0.75}, "--sparsify-until"), ({"sparsify_until": -0.1}, "--sparsify-until"),
    ({"sparsify_until": 0.6, "rewire_until": 0.5}, "--sparsify-until"),
])
def test_bad_values_name_the_option_and_the_value(overrides, flag):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, {}, overrides)
    msg = str(info.value)
    assert flag in msg and "\n" not in msg and "expected" in msg


def test_unknown_preset_and_unknown_option():
    with pytest.raises(ConfigError, match="unknown preset 'cifar11'.*fashion-mnist-quick"):
        resolve_config("cifar11")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        resolve_config(None, {"learning_rate": 0.1})


def test_bad_config_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("model, expected", [("small_cnn", 0.05), ("wide_cnn", 0.05), ("vgg_cnn", 0.05),
                                             ("lstm", 0.5), ("gru", 0.5), ("lstm_perm", 0.5), ("gru_perm", 0.5)])
def test_the_model_sets_the_lr_unless_one_is_given(tmp_path, model, expected):
    assert resolve_config(overrides={"model": model}).lr == expected
    assert TrainConfig(model=model).validate().lr == expected  # the Python API resolves it the same way
    assert resolve_config(overrides={"model": model, "lr": 0.2}).lr == 0.2  # a flag wins
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {model}\nlr: 0.3\n")
    assert resolve_config(file_values=load_config_file(str(path))).lr == 0.3  # so does a config file
    assert resolve_config("cifar10-vgg16-irregular", overrides={"model": model}).lr == 0.1  # and a preset's lr
    # what ran is what is saved: the resolved value, so a resume or a reused compare cell sees the same rate
    assert resolve_config(overrides={"model": model}).to_dict()["lr"] == expected


def test_config_round_trips_through_its_dict():
    cfg = resolve_config("cifar100-resnet18-channel", {}, {"warmup_epochs": 5})
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))).validate() == cfg


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_lr_schedules_with_warmup(schedule):
    cfg = resolve_config(None, {}, {"lr_schedule": schedule, "warmup_epochs": 2, "epochs": 10,
                                    "lr_milestones": [0.5, 0.75], "lr_gamma": 0.1})
    total, per_epoch = 100, 10
    f = [lr_factor(cfg, k, total, per_epoch) for k in range(total)]
    assert f[:20] == pytest.approx([(k + 1) / 20 for k in range(20)])  # linear warm-up over 2 epochs
    if schedule == "cosine":
        assert f[20] == 1.0 and f[60] == pytest.approx(0.5)
        assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))
        assert all(a >= b for a, b in zip(f[20:], f[21:]))
    elif schedule == "step":
        assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
        assert f[75] == pytest.approx(0.01)
    else:
        assert f[20:] == [1.0] * 80


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_seed_must_fit_numpy(seed, ok):
    if ok:
        assert resolve_config(None, {}, {"seed": seed}).seed == seed
    else:
        with pytest.raises(ConfigError, match=rf"option --seed: got {seed}, expected an integer in \[0, 4294967295\]"):
            resolve_config(None, {}, {"seed": seed})


def test_validate_options_is_the_configs_own_rules_under_the_callers_names():
    from dnr.harness.config import validate_options
    assert validate_options({"eval_eps": "0.25", "seed": 3}) == {"eval_eps": 0.25, "seed": 3}
    for value in (math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"option --eps: got .*, expected a finite number"):
            validate_options({"eval_eps": value}, flags={"eval_eps": "--eps"})
    with pytest.raises(ConfigError, match=r"option --eval-alpha: got 0.0, expected a number > 0"):
        validate_options({"eval_alpha": 0.0})


@pytest.mark.parametrize("name, text, needle", [
    ("a.yaml", "", "is empty"), ("b.yaml", "# only a comment\n", "is empty"), ("c.json", "  \n", "is empty"),
    ("d.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n", "key 'lr' is given twice (line 3"),
    ("e.json", '{"train": {"lr": 1, "lr": 2}}', "key 'lr' is given twice"),
])
def test_empty_files_and_duplicate_keys_are_refused(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(str(tmp_path / name))
    assert needle in str(info.value) and name in str(info.value)
    assert load_config_file(str(_write(tmp_path, "ok.yaml", "{}"))) == {}


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name
