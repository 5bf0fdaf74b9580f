"""Screen a DNR controller variant on the README's main job (not part of the package).

usage: python docs/ablations/screen.py OUT_DIR '{"mode": "channel", "density": 0.25, "seed": 0}' '{"net_exchange": true}'

The first JSON is a set of `dnr train` options (TrainConfig fields) on top of the default preset, the
second is extra keyword arguments for the DNR controller (`dnr.DNR`), for options that have no flag
(those of channel-mode-variants.patch exist only once that patch is applied). Prints the run's final
clean / FGSM / PGD-20 accuracy on the embedded test images as one JSON line.
"""

import json
import sys

import dnr.methods.dnr as dnr_method
from dnr.harness import run
from dnr.harness.config import resolve_config

out, options, controller_kwargs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
_controller = dnr_method.DNR


def _with_kwargs(*args, **kwargs):
    kwargs.update(controller_kwargs)
    return _controller(*args, **kwargs)


dnr_method.DNR = _with_kwargs  # the method builds its controller through this module attribute
# the screens in docs/method.md start at the budget from the random masks (sparsify_until 0, the default when they
# were run); pass {"sparsify_until": null} in OPTIONS for the library's dense-to-sparse start
cfg = resolve_config(None, dict({"threads": 1, "plots": False, "eval_every": 0, "sparsify_until": 0.0}, **options))
cfg.validate()
summary = run.fit(cfg, out, quiet=True, progress=False)
print(json.dumps({"options": options, "controller": controller_kwargs,
                  **{k: summary[k] for k in ("clean", "fgsm", "pgd")}}))
