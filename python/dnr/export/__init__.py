"""Deployable exports of masked models.

- :func:`compact_model`: exact channel compaction of a channel-pruned model into a smaller dense model;
- :func:`save_sparse` / :func:`load_sparse`: compressed ``dnr-sparse`` safetensors storage (any sparsity);
- :func:`export_onnx` / :func:`check_onnx`: ONNX export checked against onnxruntime;
- :func:`export_model`: any of these plus a model card JSON (``<out>.card.json``);
- ``dnr export CHECKPOINT --format compact|sparse|onnx --out PATH`` on the command line.

safetensors, onnx and onnxruntime are optional (``pip install 'dnr[export]'``) and imported on use.
"""

from .api import FORMATS, check_compact, export_model, load_compact, save_compact
from .compact import CompactionError, ExpandChannels, check_channel_structure, compact_model
from .model_card import card_path, model_card, write_model_card
from .onnx_export import OnnxMismatchError, check_onnx, dense_copy, export_onnx, run_onnx
from .sparse_format import (SparseFormatError, SparseLayout, file_payload_bytes, load_sparse, read_sparse,
                            save_dense, save_sparse, sparse_layout)

__all__ = ["FORMATS", "export_model", "save_compact", "load_compact", "check_compact", "CompactionError",
           "ExpandChannels", "check_channel_structure", "compact_model", "card_path", "model_card",
           "write_model_card", "OnnxMismatchError", "check_onnx", "dense_copy", "export_onnx", "run_onnx",
           "SparseFormatError", "SparseLayout", "file_payload_bytes", "load_sparse", "read_sparse", "save_dense",
           "save_sparse", "sparse_layout"]
