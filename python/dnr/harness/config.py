"""Training configuration: one validated dataclass, named presets, YAML/JSON files and CLI overrides.

Resolution order (later wins): the preset (default ``fashion-mnist-quick``) < the config file's keys
< command-line flags. Every field is a CLI flag (``lr_schedule`` -> ``--lr-schedule``) with the help
text below; ``dnr train --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

from .. import methods
from ..rewiring.controller import REGROWTH
from ..curriculum import CURRICULA, RAMP_SHAPES, check_curriculum_args
from ..rewiring.schedule import REWIRE_SETTINGS
from ..models import default_lr, default_max_grad_norm  # the model's, where the options are not given
from ..evaluation import default_pgd_alpha  # the one rule for the evaluation's PGD step size

__all__ = ["ConfigError", "TrainConfig", "SAVED_BEFORE_OPTION", "PRESETS", "PUBLISHED", "DEFAULT_PRESET",
           "resolve_config",
           "validate_options", "require", "coerce_value", "check_number", "check_choice", "check_list", "SEED_RANGE", "load_config_file", "add_config_arguments", "config_overrides_from_args"]

# The compression methods (--method) are those of the dnr.methods registry: methods.available().
LR_SCHEDULES = ("cosine", "step", "constant")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("fp32", "bf16")  # fp16 would need loss scaling in the attack's input gradients too
DEFAULT_PRESET = "fashion-mnist-quick"
SEED_RANGE = (0, 2**32 - 1)  # numpy's np.random.seed accepts exactly these


# Options added after runs were first saved, with the value every run saved before them ran with. A saved
# config without the key means this, where today's default may select something else (the recurrent models
# clip their gradients by default since max_grad_norm exists; runs saved before it never clipped).
SAVED_BEFORE_OPTION = {"max_grad_norm": 0.0}


class ConfigError(ValueError):
    """A bad preset, option or value; the message names the option, the value and what was expected."""


def _f(default, help, *, type=None, choices=None, optional=False, nargs=None):
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices,
                                                        "optional": optional, "nargs": nargs})


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on (saved as ``config.json`` in the run directory)."""

    # data and model
    dataset: str = _f("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, tiny-imagenet, "
                      "synthetic (dnr.data.build_dataset)", type=str)
    data_root: str | None = _f(None, "dataset folder; 'embedded' = the Fashion-MNIST subset shipped in the package "
                               "(6000 train / 1000 test); none = the dataset's default folder", type=str,
                               optional=True)
    train_size: int | None = _f(None, "use only the first N training examples", type=int, optional=True)
    test_size: int | None = _f(None, "use only the first N test examples", type=int, optional=True)
    augment: bool = _f(False, "training-set augmentation (random crop + flip for colour datasets)", type=bool)
    model: str = _f("small_cnn", "architecture: small_cnn or wide_cnn (28x28 inputs), vgg16, resnet18, vgg_cnn (VGG-style, 28x28); "
                    "lstm, gru, lstm_perm, gru_perm (sequence models) (dnr.models.build_model)",
                    type=str)
    # method and sparsity
    method: str = _f("dnr", "compression method, a name of the dnr.methods registry", type=str)
    plugin: list = _f((), "modules to import before the run (dotted paths on sys.path) that register more "
                      "compression methods with dnr.methods.register", type=str, nargs="+")
    method_options: list | None = _f(None, "the method's own options, KEY=VALUE ... (those its class declares in "
                                     "`options`; built in: circulant and admm-circulant take gradient=sum|mean, the "
                                     "block-circulant vectors' gradient rule; a plugin's: see its docs)", type=str,
                                     nargs="+", optional=True)
    mode: str = _f("irregular", "sparsity unit: single weights or output channels", type=str,
                   choices=("irregular", "channel"))
    density: float = _f(0.05, "fraction of prunable weights kept, in (0, 1] (0.05 = 20x)", type=float)
    init: str = _f("uniform", "initial mask: uniform density per layer or Erdos-Renyi-Kernel", type=str,
                   choices=("uniform", "erk"))
    prune_first: bool = _f(True, "prune the first conv layer", type=bool)
    prune_last: bool | None = _f(None, "prune the last linear layer (default: yes for irregular, no for "
                                 "channel)", type=bool, optional=True)
    rewire: str = _f("auto", "DNR rewiring settings: auto (budget-aware: small rewirings every few steps until "
                     "3/4 of training; the library's default) or paper (half the active weights at every epoch "
                     "end, the DNR paper's schedule); the five options below override single settings", type=str,
                     choices=tuple(REWIRE_SETTINGS))
    prune_rate: float | None = _f(None, "DNR initial prune rate p0, in (0, 1) (auto: 0.3, paper: 0.5)", type=float,
                                  optional=True)
    prune_rate_min: float | None = _f(None, "DNR prune rate p_min at the rewiring horizon, in [0, p0] (0.005)",
                                      type=float, optional=True)
    prune_schedule: str = _f("cosine", "prune-rate schedule over training", type=str,
                             choices=("cosine", "linear", "constant"))
    rewire_every: int | None = _f(None, "rewire every K optimizer steps (auto: about 20 rewirings, at most 100 "
                                  "steps apart; paper: at epoch ends)", type=int, optional=True)
    rewire_until: float | None = _f(None, "no rewiring after this fraction of training, in (0, 1] (auto: 0.75, "
                                    "paper: 1)", type=float, optional=True)
    regrowth: str | None = _f(None, "DNR regrowth criterion: momentum, gradient, output_gradient (channels), "
                              "random, or auto (momentum for weights, output_gradient for channels); paper: "
                              "momentum", type=str, optional=True, choices=REGROWTH)
    min_active: float | None = _f(None, "DNR per-layer floor: a number of units (an integer >= 1) or a fraction "
                                  "of the layer's initial units in (0, 1) (auto: 1 weight, or half the initial "
                                  "channels in channel mode)", type=float, optional=True)
    sparsify_until: float | None = _f(None, "DNR dense-to-sparse start: train dense and prune each layer by "
                                      "magnitude to its budget on a cubic schedule that ends at this fraction of "
                                      "training, in [0, rewire_until) (auto: rewire_until / 3, i.e. 0.25, in irregular "
                                      "mode, 0 in channel mode; 0: start at the budget from the random masks; "
                                      "paper: 0)",
                                      type=float, optional=True)
    # baselines (oneshot, admm, rsr): a first phase, one exact-budget prune, masked fine-tuning
    phase_split: float = _f(0.5, "oneshot/admm/rsr: fraction of the epochs before the prune (dense AT, ADMM or "
                            "RSR training); the rest is masked AT fine-tuning with the lr schedule restarted",
                            type=float)
    prune_scope: str | None = _f(None, "oneshot/admm/rsr: magnitude ranking per layer ('layer', with the --init "
                                 "split) or over all layers ('global'); default layer for oneshot and admm, global "
                                 "for rsr", type=str, optional=True, choices=("layer", "global"))
    admm_rho: float = _f(1e-2, "admm: penalty weight rho at the start; it grows geometrically to --admm-rho-max "
                         "over the ADMM phase", type=float)
    admm_rho_max: float = _f(1.0, "admm: rho at the last Z/U update of the ADMM phase", type=float)
    admm_every: int | None = _f(None, "admm: optimizer steps between Z/U updates (default: 4 per epoch)", type=int,
                                optional=True)
    rsr_l1: float = _f(5e-5, "rsr: weight of the L1 penalty on the prunable weights", type=float)
    rsr_noise_init: float = _f(0.25, "rsr: initial trainable noise scale of every channel", type=float)
    # cap / cap-robust (CaP, cascaded projection; dnr.methods.cap): dense AT, projection, fine-tuning
    cap_flops: float | None = _f(None, "cap: fraction of the dense conv + linear FLOPs to keep, in (0, 1] (0.5 = 2x "
                                 "fewer; default: --density), allocated as one kept fraction of every channel space",
                                 type=float, optional=True)
    cap_ranks: list | None = _f(None, "cap: per-layer ranks LAYER=RANK (a conv/linear layer's output channels kept; "
                                "overrides --cap-flops)", type=str, nargs="+", optional=True)
    cap_steps: int = _f(200, "cap: SGD steps on the projections (0: their PCA initialisation only)", type=int)
    cap_lr: float = _f(0.01, "cap: learning rate of the projections' SGD (momentum 0.9, QR retraction)", type=float)
    cap_gamma: float = _f(1.0, "cap: weight of the feature-reconstruction term in the projections' loss", type=float)
    cap_calibration: int = _f(1024, "cap: training examples for the PCA initialisation and the projections' SGD",
                              type=int)
    # block-circulant layers (--method circulant, CirCNN; issue 16)
    block_size: int | None = _f(None, "circulant: block size k of the block-circulant weights (each k x k block "
                                "stored as one vector: about k x fewer weights); default round(1 / --density), so "
                                "that dnr compare's density axis sets it; --prune-first/--prune-last also decide "
                                "whether the first/last layer is converted", type=int, optional=True)
    # optimisation
    epochs: int = _f(6, "training epochs", type=int)
    batch_size: int = _f(128, "training batch size", type=int)
    lr: float | None = _f(None, "initial (peak) learning rate (none: the model's, dnr.models.default_lr: 0.5 for "
                          "the recurrent models, 0.05 for the others)", type=float, optional=True)
    max_grad_norm: float | None = _f(None, "clip each step's gradients to this global L2 norm (0: never; none: the "
                                     "model's, dnr.models.default_max_grad_norm: 1 for the recurrent models, never "
                                     "for the others)", type=float, optional=True)
    momentum: float = _f(0.9, "SGD momentum, in (0, 1) (DNR needs momentum)", type=float)
    nesterov: bool = _f(True, "Nesterov momentum", type=bool)
    weight_decay: float = _f(5e-4, "L2 weight decay (through the optimizer)", type=float)
    lr_schedule: str = _f("cosine", "learning-rate schedule, stepped per batch", type=str, choices=LR_SCHEDULES)
    lr_milestones: list = _f((0.5, 0.75), "step schedule: fractions of training where the lr is multiplied "
                             "by --lr-gamma", type=float, nargs="+")
    lr_gamma: float = _f(0.1, "step schedule: lr factor at each milestone", type=float)
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 over this many epochs", type=float)
    # training attack
    eps: float = _f(0.1, "L-inf radius of the training attack (pixels in [0, 1])", type=float)
    alpha: float = _f(0.025, "PGD step size of the training attack", type=float)
    attack_steps: int = _f(5, "PGD steps of the training attack", type=int)
    beta: float = _f(0.5, "weight of the clean loss in the hybrid loss, in [0, 1]", type=float)
    attack_bn_mode: str = _f("eval", "BatchNorm mode while generating training attacks", type=str,
                             choices=("eval", "train"))
    # SAT curriculum (issue 15): how hard the training attack is at each step (dnr.curriculum)
    curriculum: str = _f("none", "training curriculum: none (plain adversarial training), eps (radius ramp), p-sat "
                         "(per-example early stopping on the true class's probability), h-sat (difficulty advances "
                         "while the top Hessian eigenvalue of the adversarial loss stays low)", type=str,
                         choices=CURRICULA)
    curriculum_ramp: float = _f(0.5, "eps / p-sat / h-sat: fraction of training over which the difficulty "
                                "ramps from 0 to 1, in (0, 1]", type=float)
    curriculum_shape: str = _f("linear", "eps / p-sat: ramp shape", type=str, choices=RAMP_SHAPES)
    curriculum_prob: float = _f(0.5, "p-sat: at difficulty 0 an example's attack stops once its true-class "
                                "probability is below this, in (0, 1]; the bound falls to 0 with the difficulty",
                                type=float)
    curriculum_every: int | None = _f(None, "measure the top Hessian eigenvalue of the adversarial loss every N "
                                      "optimizer steps (0: never; none: h-sat 10 times over the ramp, the "
                                      "others never)", type=int, optional=True)
    curriculum_threshold: float | None = _f(None, "h-sat: advance while the top Hessian eigenvalue is at most "
                                            "this (>= 0); none: use --curriculum-ratio", type=float, optional=True)
    curriculum_ratio: float = _f(1.5, "h-sat without a threshold: advance while the top Hessian eigenvalue grows "
                                 "by at most this factor between measurements (>= 1)", type=float)
    curriculum_iters: int = _f(10, "power-iteration steps (Hessian-vector products) per measurement", type=int)
    # evaluation
    eval_eps: float | None = _f(None, "L-inf radius for evaluation (default: --eps)", type=float, optional=True)
    eval_alpha: float | None = _f(None, "PGD step size for evaluation (default: 2.5 * eval_eps / eval_steps)",
                                  type=float, optional=True)
    eval_steps: int = _f(20, "PGD steps for evaluation", type=int)
    eval_restarts: int = _f(1, "PGD random restarts in the final evaluation", type=int)
    eval_every: int = _f(1, "evaluate clean and PGD test accuracy every N epochs (0: only at the end)", type=int)
    eval_size: int | None = _f(None, "test examples used by the per-epoch evaluation (default: all)",
                               type=int, optional=True)
    eval_batch_size: int = _f(500, "evaluation batch size", type=int)
    # run
    seed: int = _f(0, "random seed (weights, masks, data order, attacks)", type=int)
    deterministic: bool = _f(False, "deterministic algorithms (bitwise reproducible runs and resumes)", type=bool)
    device: str = _f("auto", "cpu, cuda, cuda:N or auto", type=str)
    threads: int | None = _f(None, "torch CPU threads", type=int, optional=True)
    precision: str = _f("fp32", "training precision: fp32, or bf16 autocast for every training forward pass "
                        "(the PGD attack's too; weights, momentum and the evaluation stay float32)", type=str,
                        choices=PRECISIONS)
    compile: str = _f("off", "torch.compile the model for training: off, default, reduce-overhead (CUDA graphs), "
                      "max-autotune or max-autotune-no-cudagraphs (torch.compile's modes; the evaluation runs eager)",
                      type=str, choices=COMPILE_MODES)
    channels_last: bool = _f(False, "channels-last memory format for the model and the input batches (faster "
                             "convolutions on GPUs, with bf16 most of all)", type=bool)
    checkpoint_every: int | None = _f(None, "also checkpoint every N optimizer steps (always at epoch ends)",
                                      type=int, optional=True)
    tensorboard: bool = _f(False, "write TensorBoard logs to RUN_DIR/tensorboard (needs tensorboard)", type=bool)
    plots: bool = _f(True, "write the markdown report and PNG plots at the end (plots need matplotlib)",
                     type=bool)

    def _validate_method_options(self, flag, method) -> None:
        declared = method.options
        seen = set()
        for item in self.method_options or []:
            key, eq, _ = str(item).partition("=")
            if not eq or not key:
                raise ConfigError(f"option {flag('method_options')}: got {item!r}, expected KEY=VALUE")
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise ConfigError(f"option {flag('method_options')}: got {key!r}, expected an option of method "
                                  f"{self.method!r} ({known})")
            if key in seen:
                raise ConfigError(f"option {flag('method_options')}: {key!r} is given twice")
            seen.add(key)
        self.method_settings  # noqa: B018  (each value's type: a one-line ConfigError naming the option)

    # ------------------------------------------------------------------ derived values
    @property
    def method_class(self) -> type:
        """The class of ``method`` in the dnr.methods registry (after ``plugin`` is imported)."""
        methods.import_plugins(self.plugin)
        try:
            return methods.get(self.method)
        except methods.UnknownMethodError as err:
            raise ConfigError(f"option --method: {err}") from None

    @property
    def sparse(self) -> bool:
        """The run trains a masked model (the method's declaration)."""
        return self.method_class.sparse

    @property
    def rewiring_settings(self) -> dict:
        """The keyword arguments of ``dnr.DNR`` for this run: ``REWIRE_SETTINGS[rewire]`` with the options
        that are set."""
        settings = dict(REWIRE_SETTINGS[self.rewire])
        settings["schedule"] = self.prune_schedule
        for option in ("prune_rate", "prune_rate_min", "rewire_every", "rewire_until", "regrowth", "sparsify_until"):
            if getattr(self, option) is not None:
                settings[option] = getattr(self, option)
        if self.min_active is not None:  # an integral value counts units, a fraction is relative
            settings["min_active"] = int(self.min_active) if self.min_active >= 1 else float(self.min_active)
        return settings

    def curriculum_settings(self, total_steps: int) -> dict:
        """The keyword arguments of ``dnr.curriculum.create(self.curriculum, ...)`` for a run of
        ``total_steps`` optimizer steps (resolves ``curriculum_every``)."""
        every = self.curriculum_every
        if every is None:  # h-sat decides about 10 times over its ramp; the others do not measure
            every = max(1, round(self.curriculum_ramp * total_steps / 10)) if self.curriculum == "h-sat" else 0
        return dict(total_steps=total_steps, ramp=self.curriculum_ramp, shape=self.curriculum_shape,
                    prob=self.curriculum_prob, every=every, threshold=self.curriculum_threshold,
                    ratio=self.curriculum_ratio, power_iters=self.curriculum_iters, seed=self.seed)

    @property
    def phased(self) -> bool:
        """The method prunes once after ``pre_epochs`` epochs; the lr schedule restarts there."""
        return self.method_class.phased

    @property
    def pre_epochs(self) -> int:
        """Phased methods: epochs before the prune (at least 1, leaving at least 1 for fine-tuning)."""
        return min(self.epochs - 1, max(1, math.floor(self.phase_split * self.epochs + 0.5)))

    @property
    def resolved_prune_scope(self) -> str:
        return self.prune_scope or ("global" if self.method == "rsr" else "layer")

    @property
    def adversarial(self) -> bool:
        return self.method_class.adversarial

    @property
    def resolved_eval_eps(self) -> float:
        return self.eps if self.eval_eps is None else self.eval_eps

    @property
    def method_settings(self) -> dict[str, Any]:
        """The method's options (its class's ``options``: name -> default) with ``method_options`` applied,
        each value of its default's type (checked by ``validate``)."""
        declared = self.method_class.options
        settings = dict(declared)
        for item in self.method_options or []:
            key, _, text = str(item).partition("=")
            settings[key] = coerce_value(f"option --method-options {key}", text, type(declared[key]))
        return settings

    @property
    def resolved_block_size(self) -> int:
        """circulant: ``block_size``, or round(1 / density) when it is not set (issue 16)."""
        return self.block_size if self.block_size is not None else max(1, round(1.0 / self.density))

    @property
    def resolved_eval_alpha(self) -> float:
        if self.eval_alpha is not None:
            return self.eval_alpha
        return default_pgd_alpha(self.resolved_eval_eps, self.eval_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, values: dict) -> "TrainConfig":
        """The validated config of a saved run (config.json, a checkpoint's ``config``). An option the run's
        dnr did not have yet takes the value that run ran with (SAVED_BEFORE_OPTION), not today's default:
        a resumed or re-read run keeps its behaviour."""
        return cls(**{**SAVED_BEFORE_OPTION, **values}).validate()

    # ------------------------------------------------------------------ validation
    def validate(self, *, flags: dict[str, str] | None = None) -> "TrainConfig":
        """Check every field; raises ConfigError naming the first bad one. Returns self.

        Args:
            flags: the option name to show for a field in errors, where a command calls it otherwise
                (``dnr eval --eps`` sets ``eval_eps``); default ``--field-name``.
        """
        def flag(name):
            return (flags or {}).get(name) or _flag(name)

        # the plugins first: they register the methods that --method may name
        self.plugin = _coerce(flag("plugin"), self.plugin if self.plugin is not None else [],
                              TrainConfig.__dataclass_fields__["plugin"].metadata)
        try:
            methods.import_plugins(self.plugin)
        except methods.PluginError as err:
            raise ConfigError(f"option {flag('plugin')}: {err}") from None
        if not isinstance(self.method, str) or self.method not in methods.available():
            raise ConfigError(f"option {flag('method')}: got {self.method!r}, expected one of "
                              f"{list(methods.available())} (a plugin module registers more: --plugin MODULE)")
        method = self.method_class

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                if not meta["optional"]:
                    raise ConfigError(f"option {flag(f.name)} must not be empty (got None)")
                continue
            setattr(self, f.name, _coerce(flag(f.name), value, meta))
            if meta["choices"] and getattr(self, f.name) not in meta["choices"]:
                raise ConfigError(f"option {flag(f.name)}: got {value!r}, expected one of {list(meta['choices'])}")

        def need(name, ok, expected):
            require(f"option {flag(name)}", getattr(self, name), ok, expected)

        # resolved here, so that config.json and checkpoints hold what ran
        if self.lr is None:
            self.lr = default_lr(self.model)
        if self.max_grad_norm is None:
            self.max_grad_norm = default_max_grad_norm(self.model)

        need("density", 0.0 < self.density <= 1.0, "a number in (0, 1]")
        if self.prune_rate is not None:
            need("prune_rate", 0.0 < self.prune_rate < 1.0, "a number in (0, 1)")
        p0 = self.rewiring_settings["prune_rate"]
        if self.prune_rate_min is not None:
            need("prune_rate_min", 0.0 <= self.prune_rate_min <= p0, f"a number in [0, p0={p0}]")
        if self.rewire_until is not None:
            need("rewire_until", 0.0 < self.rewire_until <= 1.0, "a number in (0, 1]")
        if self.sparsify_until is not None:
            until = self.rewiring_settings["rewire_until"]
            need("sparsify_until", 0.0 <= self.sparsify_until < until, f"a number in [0, rewire_until={until})")
        if self.min_active is not None:
            need("min_active", 0.0 < self.min_active < 1.0 or (self.min_active >= 1 and self.min_active.is_integer()),
                 "an integer >= 1 or a fraction in (0, 1)")
        for name in ("epochs", "batch_size", "attack_steps", "eval_steps", "eval_restarts", "eval_batch_size"):
            need(name, getattr(self, name) >= 1, "an integer >= 1")
        for name in ("train_size", "test_size", "eval_size", "rewire_every", "checkpoint_every", "threads"):
            if getattr(self, name) is not None:
                need(name, getattr(self, name) >= 1, "an integer >= 1 (or none)")
        need("seed", SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (2**32 - 1)")
        need("eval_every", self.eval_every >= 0, "an integer >= 0")
        need("lr", self.lr > 0, "a number > 0")
        need("max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0: never clip)")
        need("momentum", 0.0 < self.momentum < 1.0, "a number in (0, 1)")
        need("weight_decay", self.weight_decay >= 0, "a number >= 0")
        need("lr_gamma", 0.0 < self.lr_gamma <= 1.0, "a number in (0, 1]")
        need("lr_milestones", all(0.0 < m < 1.0 for m in self.lr_milestones), "fractions of training in (0, 1)")
        need("warmup_epochs", 0.0 <= self.warmup_epochs < self.epochs, f"a number in [0, epochs={self.epochs})")
        need("eps", self.eps >= 0, "a number >= 0")
        need("alpha", self.alpha > 0, "a number > 0")
        need("beta", 0.0 <= self.beta <= 1.0, "a number in [0, 1]")
        if self.eval_eps is not None:
            need("eval_eps", self.eval_eps >= 0, "a number >= 0")
        if self.eval_alpha is not None:
            need("eval_alpha", self.eval_alpha > 0, "a number > 0")
        need("device", self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "cpu, cuda, cuda:N or auto")
        if self.data_root == "embedded" and self.dataset != "fashion-mnist":
            raise ConfigError(f"option --data-root: 'embedded' is the Fashion-MNIST subset, but --dataset is "
                              f"{self.dataset!r}; give that dataset's folder")
        if method.needs_sparse_target and self.density == 1.0:
            raise ConfigError(f"option --density: got 1.0, but --method {self.method} needs a sparse model "
                              "(density < 1)")
        need("phase_split", 0.0 < self.phase_split < 1.0, "a number in (0, 1)")
        need("admm_rho", self.admm_rho > 0, "a number > 0")
        need("admm_rho_max", self.admm_rho_max >= self.admm_rho, f"a number >= --admm-rho ({self.admm_rho})")
        if self.admm_every is not None:
            need("admm_every", self.admm_every >= 1, "an integer >= 1 (or none)")
        need("rsr_l1", self.rsr_l1 >= 0, "a number >= 0")
        need("rsr_noise_init", self.rsr_noise_init >= 0, "a number >= 0")
        self._validate_curriculum(flag)
        if self.cap_flops is not None:
            need("cap_flops", 0.0 < self.cap_flops <= 1.0, "a number in (0, 1]")
        need("cap_steps", self.cap_steps >= 0, "an integer >= 0")
        need("cap_lr", self.cap_lr > 0, "a number > 0")
        need("cap_gamma", self.cap_gamma >= 0, "a number >= 0")
        need("cap_calibration", self.cap_calibration >= 1, "an integer >= 1")
        if self.block_size is not None:  # circulant (issue 16)
            need("block_size", self.block_size >= 1, "an integer >= 1 (or none: round(1 / --density))")
        self._validate_method_options(flag, method)
        problem = method.check_config(self)  # the method's own rules (e.g. two phases need two epochs)
        if problem:
            raise ConfigError(problem)
        return self


    def _validate_curriculum(self, flag) -> None:
        """The SAT curriculum's options, by dnr.curriculum's own rules (one place), named as options."""
        options = {"name": "curriculum", "ramp": "curriculum_ramp", "shape": "curriculum_shape",
                   "prob": "curriculum_prob", "every": "curriculum_every", "threshold": "curriculum_threshold",
                   "ratio": "curriculum_ratio", "power_iters": "curriculum_iters"}
        try:
            check_curriculum_args(self.curriculum, **{k: v for k, v in self.curriculum_settings(1).items()
                                                      if k not in ("total_steps", "seed")},
                                  subject=lambda arg: f"option {flag(options[arg])}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        attacked = self.adversarial and self.beta < 1.0
        if self.curriculum != "none" and not attacked:
            raise ConfigError(f"option {flag('curriculum')}: got {self.curriculum!r}, but --method {self.method} with "
                              f"--beta {self.beta:g} trains without an attack (a curriculum needs an adversarial "
                              "method and --beta < 1)")
        if self.curriculum_every and not attacked:
            raise ConfigError(f"option {flag('curriculum_every')}: got {self.curriculum_every}, but --method "
                              f"{self.method} with --beta {self.beta:g} trains without an attack (the measurement is "
                              "of the adversarial loss; expected 0 or none)")
        if self.curriculum_settings(1)["every"] and self.compile != "off":
            raise ConfigError(f"option {flag('curriculum_every')}: Hessian measurements need double backward, "
                              f"which torch.compile does not give; got --compile {self.compile}, expected off")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(flag: str, value: Any, meta: dict) -> Any:
    """Convert a value read from a file or the CLI to the field's type, or raise ConfigError naming ``flag``."""
    if meta["nargs"]:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(flag, v, {**meta, "nargs": None}) for v in value]
    return coerce_value(f"option {flag}", value, meta["type"])


# ---------------------------------------------------------------------------------------- shared checks
# The one implementation of "a value of this type, in this range": TrainConfig.validate uses it for its
# fields, and the other specs (dnr compare's config, dnr eval's flags) use it for theirs, each naming the
# value the way its user wrote it (``subject``: "option --lr", "compare config key 'seeds'").

def require(subject: str, value: Any, ok: bool, expected: str) -> None:
    """Raise ConfigError("<subject>: got <value>, expected <expected>") unless ``ok``."""
    if not ok:
        raise ConfigError(f"{subject}: got {value!r}, expected {expected}")


def coerce_value(subject: str, value: Any, typ: type, *, from_text: bool = True, optional: bool = False) -> Any:
    """``value`` as a bool / int / finite float / str, or ConfigError naming ``subject``.

    Args:
        from_text: also accept the text forms a command line gives ("3", "0.5", "yes"); a typed file
            (JSON, YAML) already has the right types, so its specs pass False.
        optional: None is allowed (and returned).
    """
    if value is None and optional:
        return None
    none = " (or null)" if optional else ""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{subject}: got {value!r}, expected true or false{none}")
    if typ is int:
        text_int = from_text and isinstance(value, str) and value.strip().lstrip("-").isdigit()
        if isinstance(value, bool) or not (isinstance(value, int) or text_int):
            raise ConfigError(f"{subject}: got {value!r}, expected an integer{none}")
        return int(value)
    if typ is float:
        ok_type = not isinstance(value, bool) and (from_text or isinstance(value, (int, float)))
        try:
            out = float(value) if ok_type else math.nan
        except (TypeError, ValueError):
            out = math.nan
        if not math.isfinite(out):
            raise ConfigError(f"{subject}: got {value!r}, expected a finite number{none}")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"{subject}: got {value!r}, expected a string{none}")
    return value


def check_number(subject: str, value: Any, typ: type = float, *, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None, optional: bool = False, from_text: bool = False):
    """A number of type ``typ`` (int or float) in [lo, hi] (or (lo, hi] with ``lo_open``); None if optional."""
    value = coerce_value(subject, value, typ, from_text=from_text, optional=optional)
    if value is None:
        return None
    kind = "an integer" if typ is int else "a number"
    bounds = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else None,
              f"<= {hi:g}" if hi is not None else None]
    expected = f"{kind} {' and '.join(b for b in bounds if b)}".strip()
    require(subject, value, (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi),
            expected)
    return value


def check_choice(subject: str, value: Any, choices, what: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ConfigError listing them."""
    require(subject, value, isinstance(value, str) and value in choices,
            f"one of {list(choices)}" + (f" ({what})" if what else ""))
    return value


def check_list(subject: str, value: Any) -> list:
    """A non-empty list without duplicates (a single value is a list of one)."""
    if value is None:
        raise ConfigError(f"{subject} is missing: give a non-empty list")
    if not isinstance(value, (list, tuple)):
        value = [value]
    require(subject, list(value), bool(value), "a non-empty list")
    require(subject, list(value), len(set(map(repr, value))) == len(value), "a list without duplicates")
    return list(value)


# ---------------------------------------------------------------------------------------- presets
_PAPER = dict(method="dnr", density=0.05, epochs=200, eps=8 / 255, alpha=2 / 255, attack_steps=7, beta=0.5,
              lr=0.1, batch_size=128, weight_decay=5e-4, momentum=0.9, nesterov=False, lr_schedule="step",
              lr_milestones=[0.5, 0.75], lr_gamma=0.1, eval_eps=8 / 255, eval_alpha=2 / 255, eval_steps=20,
              augment=True, eval_every=10, eval_size=1000, eval_batch_size=256)

PRESETS: dict[str, dict] = {
    # the default `dnr train`: minutes on two CPU cores, embedded Fashion-MNIST subset, DNR at 20x
    "fashion-mnist-quick": dict(dataset="fashion-mnist", data_root="embedded", model="small_cnn", method="dnr",
                                mode="irregular", density=0.05, epochs=4, batch_size=128, nesterov=True,
                                lr_schedule="cosine", eps=0.1, alpha=0.025, attack_steps=5, eval_steps=20,
                                eval_every=1, eval_size=200, train_size=None),
}
# The paper's published numbers for the paper-scale presets (for comparison; never used by a test or a run).
PUBLISHED: dict[str, dict] = {
    "cifar10-resnet18-irregular": dict(
        clean=87.32, pgd=47.35, autoattack=40.41,
        source="DNR (Kundu et al., ASP-DAC 2021), density 0.05, 200 epochs: clean and PGD from the authors "
               "(eps 8/255, PGD-7, step 0.01); AutoAttack from RobustBench entry Kundu2020Tunable"),
    "cifar10-vgg16-irregular": dict(
        clean=86.74, pgd=None, autoattack=None,
        source="DNR (Kundu et al., ASP-DAC 2021), density 0.05, 200 epochs: clean accuracy from the authors"),
}

for _data in ("cifar10", "cifar100", "tiny-imagenet"):
    for _model in (("vgg16",) if _data == "tiny-imagenet" else ("vgg16", "resnet18")):
        for _mode in ("irregular", "channel"):
            PRESETS[f"{_data}-{_model}-{_mode}"] = dict(_PAPER, dataset=_data, model=_model, mode=_mode)

# CaP (cascaded projection, --method cap): the quick Fashion-MNIST setting at 2x fewer FLOPs, and the paper's
# CIFAR-10 settings for VGG16 and ResNet-18 at 4x fewer FLOPs (CaP's own target); half of the epochs are dense
# AT, half fine-tuning of the projected network
PRESETS["fashion-mnist-small_cnn-cap"] = dict(PRESETS[DEFAULT_PRESET], method="cap", cap_flops=0.5)
for _model in ("vgg16", "resnet18"):
    PRESETS[f"cifar10-{_model}-cap"] = dict(_PAPER, dataset="cifar10", model=_model, method="cap", cap_flops=0.25)
# block-circulant presets (--method circulant, issue 16): the quick job's budget on the small CNN, and the
# paper-scale recipe at k = 16 (about DNR's 20x) for VGG16 and ResNet-18
PRESETS["fashion-mnist-circulant"] = dict(PRESETS["fashion-mnist-quick"], method="circulant", block_size=8,
                                          density=1 / 8)
for _model in ("vgg16", "resnet18"):
    PRESETS[f"cifar10-{_model}-circulant"] = dict(_PAPER, dataset="cifar10", model=_model, method="circulant",
                                                  block_size=16, density=1 / 16)


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml, needs pyyaml) or JSON file holding a mapping of option -> value.

    A ``preset`` key names the preset the file builds on."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    empty = ConfigError(f"config file {path!r} is empty: expected a mapping of option: value (write {{}} for no "
                        "settings)")
    if not text.strip():
        raise empty
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"config file {path!r} is YAML but pyyaml is not installed: pip install pyyaml "
                              "(or pip install 'dnr[harness]'), or use a .json file") from None
        try:
            data = yaml.load(text, Loader=_unique_key_yaml_loader(yaml))
        except _DuplicateKey as err:
            raise ConfigError(f"config file {path!r}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise ConfigError(f"config file {path!r}: {err}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path!r} is not valid JSON: {err}") from None
    if data is None:  # an empty file (or only comments) is a mistake, not "no settings"
        raise empty
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def validate_options(values: dict, *, flags: dict[str, str] | None = None) -> dict:
    """Check some TrainConfig options by the config's own rules (the one place they live), the others at
    their defaults; returns the values converted to the fields' types.

    Commands that take a few of these options under their own names (``dnr eval --eps`` is
    ``eval_eps``) pass ``flags`` so that errors name the option the user typed.

    Raises:
        ConfigError: the first bad value, naming its option.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"validate_options: not TrainConfig fields: {unknown}")
    cfg = TrainConfig(**values).validate(flags=flags)
    return {k: getattr(cfg, k) for k in values}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error (json keeps the last one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice (expected each option once)")
        out[key] = value
    return out


def _unique_key_yaml_loader(yaml):
    """A SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently)."""
    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}; expected "
                                        "each option once)")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return UniqueKeyLoader


def resolve_config(preset: str | None = None, file_values: dict | None = None,
                   overrides: dict | None = None) -> TrainConfig:
    """Preset < config-file values < overrides, validated.

    Raises:
        ConfigError: unknown preset, unknown option or bad value.
    """
    file_values = dict(file_values or {})
    file_preset = file_values.pop("preset", None)
    name = preset or file_preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(PRESETS[name])
    for source, layer in (("config file", file_values), ("override", overrides or {})):
        unknown = sorted(set(layer) - fields)
        if unknown:
            raise ConfigError(f"unknown option(s) in {source}: {', '.join(unknown)}; see dnr train --help")
        values.update(layer)
    explicit_root = "data_root" in file_values or "data_root" in (overrides or {})
    if not explicit_root and values.get("data_root") == "embedded" and values.get("dataset") != "fashion-mnist":
        values["data_root"] = None  # the preset's embedded Fashion-MNIST does not apply to another dataset
    return TrainConfig(**values).validate()


# ---------------------------------------------------------------------------------------- CLI flags
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field. Defaults are SUPPRESSed so only given flags override."""
    group = parser.add_argument_group("training options (override the preset and the config file)")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        preset_default = PRESETS[DEFAULT_PRESET].get(f.name, default)
        help_text = f"{meta['help']} [{DEFAULT_PRESET}: {preset_default}]"
        if f.name == "method":  # the registry's methods now (with any --plugin already imported)
            help_text += ": " + "; ".join(f"{name}: {methods.get(name).description}" for name in methods.available())
        flag = _flag(f.name)
        if meta["type"] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["nargs"]:
            kwargs["nargs"] = meta["nargs"]
        kwargs["type"] = _cli_type(meta["type"], meta["optional"])
        if not meta["choices"]:
            kwargs["metavar"] = {"dataset": "NAME", "model": "NAME", "method": "NAME", "data_root": "DIR",
                                 "device": "DEV", "plugin": "MODULE"}.get(
                f.name, {int: "N", float: "X", str: "S"}[meta["type"]])
        group.add_argument(flag, **kwargs)


def _cli_type(typ, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if typ is int else 'a number'}{' or none' if optional else ''}, "
                f"got {text!r}") from None
    parse.__name__ = typ.__name__
    return parse


def config_overrides_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}
