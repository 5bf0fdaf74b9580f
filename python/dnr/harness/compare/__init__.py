"""``dnr compare``: grids of models x methods x modes x densities x seeds from one config, one report.

Every cell is trained with :func:`dnr.harness.fit` into its own run directory and then evaluated with
:func:`dnr.evaluation.robust_evaluation` (clean, FGSM, PGD at several step counts with restarts, AutoAttack,
an eps sweep and sanity checks) under its grid's evaluation settings. The report is rebuilt from the
per-cell files only, so every number in it is one that a run directory holds.

    spec      CompareSpec: the validated config (models, grids, eval and train blocks) and the cells it plans
    runner    run_compare: train / reuse / resume and evaluate every cell, then write the report
    report    write_compare_report: compare.json, compare.md, plots

Output folder ``OUT``::

    compare_spec.json    the validated spec, the command that made it, the machine, the planned cells
    runs/<cell>/         one run directory per cell (``fit``'s files + robust_eval.json)
    compare.json         the spec, every cell's numbers (with its model) and the mean / std over seeds
    compare.md           the markdown report (tables per (model, mode), failed sanity checks, where DNR wins)
    plots/               clean_vs_compression[-<model>].png, robust_vs_compression[-<model>].png (matplotlib)

Cells: a sparse method (``TrainConfig.sparse``) gets one cell per (model, mode, density, seed), named
``[<model>-]<method>-<mode>-d<density>-s<seed>``; a density-independent method (dense, dense-at) one cell
per (model, seed), ``[<model>-]<method>-s<seed>``, trained at density 1.0 and shown in every mode's table as
the 1x reference. The model prefix appears when the config names several models, or sets ``model_prefix``
(``--models`` narrowing a several-model config sets it, so the cells keep their names).

A folder that already records cells (compare_spec.json) takes a run that plans all of them or more (the record
is replaced) or some of them with their recorded settings (the record is kept); anything else is refused
before anything is written (:func:`~dnr.harness.compare.runner.folder_relation`).

Std over seeds is the sample standard deviation (ddof=1; 0 for a single seed).
"""

from .report import draw_plots, write_compare_report
from .runner import cell_state, machine_info, run_cell, run_compare
from .spec import (EVAL_DEFAULTS, CompareSpec, Grid, cell_key, load_compare_config, override_lists,
                   plan_cells, validate_compare_spec)

OUTPUT_FILES = ("compare_spec.json", "compare.json", "compare.md")  # written into the output folder

__all__ = ["OUTPUT_FILES", "run_compare", "write_compare_report", "load_compare_config", "validate_compare_spec",
           "plan_cells", "EVAL_DEFAULTS", "CompareSpec", "Grid", "cell_key", "cell_state", "run_cell",
           "machine_info", "draw_plots", "override_lists"]
