"""Analysis tools for trained models: the loss landscape's curvature (top Hessian eigenvalue)."""

from .hessian import hessian_top_eigenvalue, hessian_vector_product

__all__ = ["hessian_top_eigenvalue", "hessian_vector_product"]
