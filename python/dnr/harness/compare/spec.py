"""The spec of ``dnr compare``: the validated config (:class:`CompareSpec`) and the cells it plans.

A config names the shared training options (``preset``, ``train``), the models, one or several grids
(methods x modes x densities x seeds, each with its own ``eval`` and optionally ``train`` block) and a
title. Without ``grids`` the top-level methods / modes / densities / seeds / eval form the one grid (the
original format); with ``grids`` those top-level keys are the defaults of every grid's missing keys.

Every value is checked by the shared checks of :mod:`dnr.harness.config` (``check_number``,
``check_list``, ...) and every cell's training config by ``TrainConfig.validate``, so a bad config fails
before any training with one line naming the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ... import methods as method_registry
from ...models import MODEL_NAMES
from .. import config as hconfig
from ..config import (ConfigError, TrainConfig, check_choice, check_list, check_number, load_config_file, require,
                      resolve_config)

__all__ = ["CompareSpec", "Grid", "load_compare_config", "validate_compare_spec", "plan_cells", "cell_key",
           "evaluation_settings", "override_lists", "SPEC_KEYS", "GRID_KEYS", "EVAL_DEFAULTS", "MODES"]

SPEC_KEYS = ("preset", "train", "models", "model_prefix", "methods", "modes", "densities", "seeds", "eval", "grids",
             "title")
GRID_KEYS = ("methods", "modes", "densities", "seeds", "eval", "train")  # what a grid may set
EVAL_DEFAULTS = {"test_size": None, "pgd_steps": [20, 50], "restarts": 2, "fgsm": True, "autoattack": True,
                 "autoattack_examples": 500, "sweep_eps": None, "sweep_steps": 20, "sweep_examples": 500,
                 "eps": None, "alpha": None}
GRID_TRAIN_KEYS = ("method", "mode", "density", "seed")  # set per cell: not allowed in `train`
MODES = ("irregular", "channel")


def load_compare_config(path: str) -> dict:
    """Read a compare config (YAML or JSON mapping). Keys are not validated here (see validate_compare_spec)."""
    return load_config_file(path)


def _key(name: str) -> str:
    return f"compare config key {name!r}"


def _mapping(name: str, value: Any, expected: str) -> dict:
    value = {} if value is None else value
    require(_key(name), value, isinstance(value, dict), expected)
    return {str(k).replace("-", "_"): v for k, v in value.items()}


# ---------------------------------------------------------------------------------------- blocks
def _train_block(name: str, train: Any) -> dict:
    """A ``train`` block: TrainConfig options shared by the cells (the per-cell keys are refused)."""
    train = _mapping(name, train, "a mapping of TrainConfig option: value")
    grid_keys = sorted(set(train) & set(GRID_TRAIN_KEYS))
    if grid_keys:
        raise ConfigError(f"{_key(name)}: {', '.join(grid_keys)} is set per cell by the grid; use "
                          "the keys methods, modes, densities and seeds instead")
    bad = sorted(set(train) - {f.name for f in dataclasses.fields(TrainConfig)})
    if bad:
        raise ConfigError(f"{_key(name)}: unknown TrainConfig option(s) {', '.join(map(repr, bad))}; "
                          "see dnr train --help")
    return train


def _eval_block(name: str, ev: Any) -> dict:
    """An ``eval`` block's keys checked for names (values are checked once merged, by _eval_settings)."""
    ev = _mapping(name, ev, "a mapping of evaluation setting: value")
    bad = sorted(set(ev) - set(EVAL_DEFAULTS))
    if bad:
        raise ConfigError(f"{_key(name)}: unknown setting(s) {', '.join(map(repr, bad))}; expected "
                          f"{', '.join(EVAL_DEFAULTS)}")
    return ev


def _eval_settings(name: str, ev: dict, base: TrainConfig) -> dict:
    """The evaluation settings of a grid: defaults < top-level eval < the grid's eval, checked; eps defaults
    to the cells' evaluation eps (TrainConfig.resolved_eval_eps), the sweep to [0, eps/2, eps, 2 eps, 0.3, 0.5]."""
    e = dict(EVAL_DEFAULTS, **ev)
    k = lambda sub: _key(f"{name}.{sub}")  # noqa: E731
    e["test_size"] = check_number(k("test_size"), e["test_size"], int, lo=1, optional=True)
    steps = e["pgd_steps"] if isinstance(e["pgd_steps"], (list, tuple)) else [e["pgd_steps"]]
    require(k("pgd_steps"), list(steps), bool(steps), "a non-empty list of integers >= 1")
    e["pgd_steps"] = sorted({check_number(k("pgd_steps"), s, int, lo=1) for s in steps})
    e["restarts"] = check_number(k("restarts"), e["restarts"], int, lo=1)
    for flag in ("fgsm", "autoattack"):
        e[flag] = hconfig.coerce_value(k(flag), e[flag], bool, from_text=False)
    for n in ("autoattack_examples", "sweep_examples"):
        e[n] = check_number(k(n), e[n], int, lo=1, optional=True)
    e["sweep_steps"] = check_number(k("sweep_steps"), e["sweep_steps"], int, lo=1)
    e["eps"] = check_number(k("eps"), e["eps"], lo=0.0, optional=True)
    e["alpha"] = check_number(k("alpha"), e["alpha"], lo=0.0, lo_open=True, optional=True)
    if e["sweep_eps"] is not None:
        sweep = e["sweep_eps"] if isinstance(e["sweep_eps"], (list, tuple)) else [e["sweep_eps"]]
        e["sweep_eps"] = sorted({check_number(k("sweep_eps"), x, lo=0.0) for x in sweep})
    if e["eps"] is None:
        e["eps"] = base.resolved_eval_eps
    if e["sweep_eps"] is None:
        x = e["eps"]
        e["sweep_eps"] = sorted({round(v, 10) for v in (0.0, x / 2, x, 2 * x, 0.3, 0.5)})
    return e


# ---------------------------------------------------------------------------------------- the spec
@dataclasses.dataclass
class Grid:
    """One grid of cells: methods x modes x densities x seeds, with its own evaluation and training options.

    ``train`` is the top-level train block with the grid's own on top; ``eval`` the resolved evaluation
    settings (every key of EVAL_DEFAULTS); ``label`` names the grid in errors ("grids[2]")."""
    methods: list[str]
    modes: list[str]
    densities: list[float]
    seeds: list[int]
    eval: dict
    train: dict
    label: str

    def to_dict(self) -> dict:
        return {"methods": list(self.methods), "modes": list(self.modes), "densities": list(self.densities),
                "seeds": list(self.seeds), "eval": dict(self.eval), "train": dict(self.train)}


@dataclasses.dataclass
class CompareSpec:
    """A validated compare config. Build it with :meth:`from_mapping`; :meth:`to_dict` is the normalised
    mapping saved in compare_spec.json (and accepted by :meth:`from_mapping` again).

    ``models`` is None when the config names none (the cells use ``train.model`` / the preset's model and
    their names carry no model prefix). ``model_prefix`` says whether cell names start with their model: None
    (the config does not say) means "when ``models`` lists several", so single-model folders keep their names;
    :func:`override_lists` sets it to True when ``--models`` narrows a several-model config, so the cells it
    keeps have the names the full config gives them. ``methods`` ... ``eval`` are the top-level keys (the defaults of
    the grids; ``eval`` resolved against the first cell); ``grids`` the resolved grids (one without
    ``grids`` in the config)."""
    preset: str | None
    train: dict
    models: list[str] | None
    grids: list[Grid]
    eval: dict
    title: str
    methods: list[str] | None = None
    modes: list[str] | None = None
    densities: list[float] | None = None
    seeds: list[int] | None = None
    explicit_grids: bool = False
    model_prefix: bool | None = None

    @classmethod
    def from_mapping(cls, raw: Any, *, threads: int | None = None) -> "CompareSpec":
        """Check every key of a compare config (and every cell's TrainConfig) and build the spec.

        Raises:
            ConfigError: naming the key, the value and what was expected; a cell whose TrainConfig is invalid;
            a cell planned by two grids with different settings.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"compare config must be a mapping of key: value, got {type(raw).__name__}")
        raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(raw) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"compare config: unknown key(s) {', '.join(map(repr, unknown))}; expected keys: "
                              f"{', '.join(SPEC_KEYS)}")
        preset = raw.get("preset")
        if preset is not None:
            check_choice(_key("preset"), preset, hconfig.PRESETS)
        train = _train_block("train", raw.get("train"))
        try:  # the train section's plugins register methods the grid may name
            method_registry.import_plugins(hconfig.validate_options({"plugin": train.get("plugin", [])})["plugin"])
        except method_registry.PluginError as err:
            raise ConfigError(f"{_key('train')}: option plugin: {err}") from None
        models = None
        if raw.get("models") is not None:
            models = [check_choice(_key("models"), m, MODEL_NAMES, "dnr.models") for m in
                      check_list(_key("models"), raw["models"])]
            if train.get("model") is not None and train["model"] not in models:
                raise ConfigError(f"{_key('train')}: model {train['model']!r} is not in models {models}; models "
                                  "sets the model per cell")
        model_prefix = raw.get("model_prefix")
        require(_key("model_prefix"), model_prefix, model_prefix is None or isinstance(model_prefix, bool),
                "true or false (cell names start with their model), or null (when models lists several)")
        require(_key("model_prefix"), model_prefix, not (model_prefix and models is None),
                "false or null when the config has no models key (there is no model to prefix the names with)")
        require(_key("model_prefix"), model_prefix, not (model_prefix is False and models and len(models) > 1),
                f"true or null when models lists several ({models}): without the prefix their cells share names")
        title = raw.get("title")
        if title is not None:
            hconfig.coerce_value(_key("title"), title, str, from_text=False)
        top_eval = _eval_block("eval", raw.get("eval"))
        top = {"methods": _methods("methods", raw.get("methods"), optional=True),
               "modes": _modes("modes", raw.get("modes"), optional=True),
               "densities": _densities("densities", raw.get("densities"), optional=True),
               "seeds": _seeds("seeds", raw.get("seeds"), optional=True)}

        explicit = raw.get("grids") is not None
        if explicit:
            raw_grids = raw["grids"]
            require(_key("grids"), raw_grids, isinstance(raw_grids, (list, tuple)) and bool(raw_grids),
                    "a non-empty list of grids (mappings of methods, modes, densities, seeds, eval, train)")
        else:
            raw_grids = [{}]
        grids, first = [], None
        for i, g in enumerate(raw_grids):
            label = f"grids[{i}]" if explicit else "the grid"
            prefix = f"grids[{i}]." if explicit else ""
            g = _mapping(f"grids[{i}]", g, "a mapping of methods, modes, densities, seeds, eval, train")
            bad = sorted(set(g) - set(GRID_KEYS))
            if bad:
                raise ConfigError(f"{_key(f'grids[{i}]')}: unknown key(s) {', '.join(map(repr, bad))}; expected "
                                  f"{', '.join(GRID_KEYS)}")
            lists = {}
            for name, check in (("methods", _methods), ("modes", _modes), ("densities", _densities),
                                ("seeds", _seeds)):
                lists[name] = check(prefix + name, g[name]) if name in g else top[name]
                if lists[name] is None:
                    raise ConfigError(f"{_key(prefix + name)} is missing: give a non-empty list")
            grid_train = dict(train, **_train_block(prefix + "train", g.get("train"))) if "train" in g else train
            if "model" in grid_train and models is not None and grid_train["model"] not in models:
                raise ConfigError(f"{_key(prefix + 'train')}: model {grid_train['model']!r} is not in models "
                                  f"{models}; models sets the model per cell")
            ev = dict(top_eval, **_eval_block(prefix + "eval", g.get("eval")))
            grid = Grid(eval=ev, train=grid_train, label=label, **lists)
            base = _resolve(preset, grid, (models or [None])[0], grid.methods[0], grid.modes[0],
                            min(grid.densities), grid.seeds[0], None, models_given=models is not None)
            grid.eval = _eval_settings(prefix + "eval", ev, base)
            grids.append(grid)
            first = first or base
        spec = cls(preset=preset, train=train, models=models, grids=grids,
                   eval=grids[0].eval if not explicit else _eval_settings("eval", top_eval, first),
                   title=title or "dnr compare", explicit_grids=explicit, model_prefix=model_prefix, **top)
        spec.plan(threads=threads)  # every cell's TrainConfig (and the grids' overlaps), up front
        return spec

    def to_dict(self) -> dict:
        return {"preset": self.preset, "train": dict(self.train), "models": self.models,
                "model_prefix": self.model_prefix, "methods": self.methods, "modes": self.modes,
                "densities": self.densities, "seeds": self.seeds,
                "eval": dict(self.eval), "title": self.title,
                "grids": [g.to_dict() for g in self.grids] if self.explicit_grids else None}

    def prefixes_cells_with_model(self) -> bool:
        """Whether cell names start with their model (``model_prefix``, else: models lists several)."""
        if self.model_prefix is not None:
            return self.model_prefix and self.models is not None
        return self.models is not None and len(self.models) > 1

    # ------------------------------------------------------------------ planning
    def plan(self, *, threads: int | None = None) -> list[dict]:
        """The cells: the union over models x grids, in that order, each once.

        Each cell: {key, model_name, method, mode (None: density-independent), target_density, seed, grids (the
        labels of the grids that plan it), eval (its evaluation settings), config (resolved TrainConfig dict)}.
        A sparse method gets a cell per (mode, density, seed); a density-independent one (dense, dense-at) one
        per seed, trained at density 1.0. Raises ConfigError naming an invalid cell, or a cell that two grids
        plan with different evaluation or training settings.
        """
        cells: dict[str, dict] = {}
        for model in self.models or [None]:
            for grid in self.grids:
                for cell in self._grid_cells(grid, model, threads):
                    old = cells.get(cell["key"])
                    if old is None:
                        cells[cell["key"]] = cell
                        continue
                    _check_same_cell(old, cell)
                    old["grids"].append(grid.label)
        return list(cells.values())

    def _grid_cells(self, grid: Grid, model: str | None, threads: int | None) -> list[dict]:
        prefix = model if self.prefixes_cells_with_model() else None
        out = []

        def add(method, mode, density, seed, reference=False):
            cfg = _resolve(self.preset, grid, model, method, "irregular" if reference else mode, density, seed,
                           threads, reference=reference, models_given=self.models is not None)
            out.append({"key": cell_key(method, None if reference else mode, None if reference else density, seed,
                                        model=prefix),
                        "model_name": cfg.model, "method": method, "mode": None if reference else mode,
                        "target_density": 1.0 if reference else density, "seed": seed, "grids": [grid.label],
                        "eval": dict(grid.eval), "config": cfg.to_dict()})

        for method in grid.methods:
            probe = _resolve(self.preset, grid, model, method, grid.modes[0], min(grid.densities), grid.seeds[0],
                             threads, models_given=self.models is not None)
            per_density = probe.method_class.density_axis
            if probe.sparse if per_density is None else per_density:
                # a method without masks (circulant, cap) has no sparsity mode: the grid's first mode names it
                for mode in grid.modes if probe.sparse else grid.modes[:1]:
                    for d in grid.densities:
                        for seed in grid.seeds:
                            add(method, mode, d, seed)
            else:
                for seed in grid.seeds:
                    add(method, None, 1.0, seed, reference=True)
        return out


def _methods(name, value, optional=False):
    if value is None and optional:
        return None
    out = check_list(_key(name), value)
    for m in out:
        check_choice(_key(name), m, method_registry.available(), "the dnr.methods registry")
    return out


def _modes(name, value, optional=False):
    if value is None and optional:
        return None
    return [check_choice(_key(name), m, MODES) for m in check_list(_key(name), value)]


def _densities(name, value, optional=False):
    if value is None and optional:
        return None
    return [check_number(_key(name), d, lo=0.0, lo_open=True, hi=1.0) for d in check_list(_key(name), value)]


def _seeds(name, value, optional=False):
    if value is None and optional:
        return None
    return [check_number(_key(name), s, int, lo=0) for s in check_list(_key(name), value)]


def _check_same_cell(old: dict, new: dict) -> None:
    """Two grids may plan the same cell only with the same settings."""
    for what, field in (("evaluation settings", "eval"), ("training configs", "config")):
        a, b = json.loads(json.dumps(old[field])), json.loads(json.dumps(new[field]))
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"compare config: cell {new['key']} is planned by {old['grids'][0]} and "
                              f"{new['grids'][0]} with different {what} ({', '.join(diff)}); give it one setting")


def _resolve(preset, grid: Grid, model, method, mode, density, seed, threads, reference=False,
             models_given=False) -> TrainConfig:
    overrides = dict(grid.train, method=method, mode=mode, density=density, seed=seed)
    if model is not None:
        overrides["model"] = model
    if threads is not None:
        overrides["threads"] = threads
    try:
        return resolve_config(preset, None, overrides)
    except ConfigError as err:
        where = (f"model {model}, " if models_given else "") + f"method {method}"
        where += ("" if reference else f", mode {mode}, density {density}") + f", seed {seed}"
        where += f", {grid.label}" if grid.label.startswith("grids[") else ""
        raise ConfigError(f"compare config: the cell ({where}) has an invalid training config: {err}") from None


def evaluation_settings(ev: dict, seed: int, model_sha: str) -> dict:
    """What robust_eval.json records as its settings: a cell's evaluation is reused only when they are equal."""
    return {"eps": ev["eps"], "alpha": ev["alpha"], "pgd_steps": list(ev["pgd_steps"]), "restarts": ev["restarts"],
            "fgsm": ev["fgsm"], "autoattack": ev["autoattack"], "autoattack_examples": ev["autoattack_examples"],
            "sweep_eps": list(ev["sweep_eps"]), "sweep_steps": ev["sweep_steps"],
            "sweep_examples": ev["sweep_examples"], "test_size": ev["test_size"], "seed": seed,
            "model_sha256": model_sha}



def _density_tag(d: float) -> str:
    return f"{d:g}"


def cell_key(method: str, mode: str | None, density: float | None, seed: int, *, model: str | None = None) -> str:
    """A cell's name (its run folder): ``[<model>-]<method>-<mode>-d<density>-s<seed>``, or
    ``[<model>-]<method>-s<seed>`` for a density-independent method. The model prefix is given only when the
    spec has several models, so single-model folders keep their names."""
    base = f"{method}-s{seed}" if mode is None else f"{method}-{mode}-d{_density_tag(density)}-s{seed}"
    return f"{model}-{base}" if model else base


def validate_compare_spec(spec: Any) -> dict:
    """Check every key of a compare config and return it normalised (CompareSpec.to_dict: lists, eval
    defaults filled in, grids resolved).

    Raises:
        ConfigError: naming the key, the value and what was expected; also any cell whose TrainConfig is
        invalid (so a bad grid fails before any training).
    """
    return CompareSpec.from_mapping(spec).to_dict()


def plan_cells(spec: Any, *, threads: int | None = None) -> list[dict]:
    """The cells of a compare config or validated spec (see :meth:`CompareSpec.plan`)."""
    if not isinstance(spec, CompareSpec):
        spec = CompareSpec.from_mapping(spec)
    return spec.plan(threads=threads)


def override_lists(raw: dict, **lists) -> dict:
    """A compare config with some of methods / modes / densities / seeds / models replaced (``dnr compare
    --methods ...``): the top-level key, and the same key of every grid that sets it, so that a flag means
    the same with and without ``grids``. None leaves a key as it is. Returns a new mapping.

    Replacing the models of a config that lists several (and does not set ``model_prefix``) keeps the model
    prefix of the cell names: ``--models vgg_cnn`` on a two-model config plans the vgg_cnn cells under the
    names the full config gives them, so it reuses (not retrains) them in the config's output folder."""
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    declared = out.get("models")
    if (lists.get("models") is not None and out.get("model_prefix") is None
            and isinstance(declared, (list, tuple)) and len(declared) > 1):
        out["model_prefix"] = True
    for key, value in lists.items():
        if value is None:
            continue
        require("override_lists", key, key in ("methods", "modes", "densities", "seeds", "models"),
                "methods, modes, densities, seeds or models")
        out[key] = list(value)
        if key != "models" and isinstance(out.get("grids"), (list, tuple)):
            out["grids"] = [dict(g, **{key: list(value)}) if isinstance(g, dict) and key in g else g
                            for g in out["grids"]]
    return out
