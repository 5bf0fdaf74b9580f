"""Compression into physically smaller dense networks: CaP, cascaded projection (``dnr.compress.cap``).

    cascaded_projection(model, data, ranks=... | flop_ratio=...)   -> a plain, smaller nn.Module
    find_projection_spaces(model, example)                          the channel spaces a projection can take
    build_projected(plan, projections)                              the network for given projections
    predict_cost(plan, ranks)                                       its FLOPs and parameters, from the shapes
    calibrate_norms(net, names, x)                                  kept BatchNorms made the identity on x

The result is built from plain ``nn.Conv2d`` / ``nn.Linear`` layers, so ``dnr.export`` takes it like a
channel-compacted model. The registered method ``cap`` (``dnr.methods.cap``) trains, projects and
fine-tunes in the harness.
"""

from .cap import AdversarialTerm, allocate_ranks, cascaded_projection, pca_projections, qr_retraction, resolve_ranks
from .projected import ProjectedLayer, build_projected, calibrate_norms, folded_weight, layer_flops, predict_cost
from .spaces import ProjectionError, ProjectionSpace, SpacePlan, find_projection_spaces

__all__ = ["cascaded_projection", "allocate_ranks", "resolve_ranks", "pca_projections", "qr_retraction",
           "AdversarialTerm", "ProjectedLayer", "build_projected", "calibrate_norms", "folded_weight", "layer_flops",
           "predict_cost",
           "ProjectionError", "ProjectionSpace", "SpacePlan", "find_projection_spaces"]
