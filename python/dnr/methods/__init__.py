"""Compression methods: one interface (:class:`CompressionMethod`), a registry by name, the built-ins.

    dense, dense-at          dense training, clean or adversarial (dnr.methods.dense)
    static                   a fixed random mask (dnr.methods.static)
    dnr                      dynamic network rewiring (dnr.methods.dnr, wrapping dnr.rewiring.DNR)
    oneshot, admm, rsr       train, prune once, fine-tune (dnr.methods.phased)
    cap, cap-robust          dense AT, cascaded projection to a smaller network, fine-tune (dnr.methods.cap)
    circulant                block-circulant weights with FFT products, CirCNN (dnr.methods.circulant)
    admm-circulant           ADMM towards block-circulant weights, then vector fine-tuning, E-RNN (dnr.methods.admm_circulant)

A user's method::

    import dnr.methods as M

    @M.register("my-method")
    class MyMethod(M.MaskedMethod):
        description = "..."
        def epoch_end(self, epoch, *, last): ...

trains with ``dnr.harness.fit(TrainConfig(method="my-method", plugin=["my_module"]), out)`` or
``dnr train --method my-method --plugin my_module`` (docs/architecture.md, "Adding a compression method").
This layer never imports the harness.
"""

from .base import CHECKPOINT_FORMATS, EXPORT_FORMATS, CompressionMethod, MaskedMethod
from .registry import PluginError, UnknownMethodError, available, create, get, import_plugins, register
from . import dense, static, dnr, phased  # noqa: E402,F401  (register the built-ins, in this order)
from . import cap  # noqa: E402,F401  (CaP: cap, cap-robust)
from . import circulant  # noqa: E402,F401  (block-circulant layers, issue 16)
from . import admm_circulant  # noqa: E402,F401  (ADMM to block-circulant weights, E-RNN, issue 17)

__all__ = ["CompressionMethod", "MaskedMethod", "CHECKPOINT_FORMATS", "EXPORT_FORMATS", "register", "get",
           "available", "create", "import_plugins", "PluginError", "UnknownMethodError"]
