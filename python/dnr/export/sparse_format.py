"""Compressed storage of masked models: only the active weights plus a compact encoding of the mask.

File format ``dnr-sparse`` version 1 is a safetensors file (``pip install safetensors``). For each masked
layer ``L`` (a state-dict pair ``L.weight`` / ``L.mask``) it stores

- ``L.weight::values``: the weights at the mask's True positions, in row-major order, [nnz];
- one mask encoding, whichever is smallest for that layer:
  ``L.weight::bitmask`` uint8 [ceil(N/8)] (one bit per weight, little-endian bit order),
  ``L.weight::index`` int32 (int64 when N >= 2**31) [nnz] (flat positions), or
  ``L.weight::rows`` uint8 [ceil(O/8)] (one bit per output channel; only for whole-channel masks:
  then ``values`` holds the active rows).

Every other state-dict entry (biases, norm layers, running statistics, dense layers) is stored as is.
``dtype="float16"``/``"bfloat16"`` stores the values and the other floating-point *parameters* in that
dtype (buffers such as running statistics keep theirs); the default keeps float32 and the round trip
is bit-exact. The safetensors metadata holds ``format``, ``version``, the ``layout`` (JSON: per entry
``[shape, dtype, encoding]``), the architecture name and a SHA-256 of all stored tensor bytes, which
:func:`load_sparse` checks before using anything.

The payload size is predicted exactly by :func:`sparse_layout` (``payload_bytes``); the file adds the
safetensors header (8 bytes + JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from torch import nn

from .._files import atomic_path, tensors_sha256
from ..nn.masked import MaskedLayer
from ._optional import require

__all__ = ["SparseFormatError", "TensorLayout", "SparseLayout", "sparse_layout", "save_sparse", "read_sparse",
           "load_sparse", "save_dense", "file_payload_bytes", "FORMAT", "VERSION"]

FORMAT = "dnr-sparse"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SEP = "::"


class SparseFormatError(ValueError):
    """A sparse file that is corrupt, of another format, or does not fit the target model."""


@dataclasses.dataclass
class TensorLayout:
    """How one state-dict entry is stored: ``encoding`` in dense/bitmask/index/rows, sizes in bytes."""

    key: str
    shape: tuple
    dtype: str
    encoding: str
    nnz: int
    stored_bytes: int
    dense_bytes: int


@dataclasses.dataclass
class SparseLayout:
    """The predicted content of a sparse file. ``payload_bytes`` = tensor bytes (header excluded)."""

    tensors: list[TensorLayout]
    value_dtype: str

    @property
    def payload_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def dense_payload_bytes(self) -> int:
        """Bytes of the dense float model (masks dropped, weights dense) in its own dtypes."""
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Predicted dense / sparse payload size."""
        return self.dense_payload_bytes / max(1, self.payload_bytes)


def _value_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2 ** 31 else torch.int64


def _plan(model: nn.Module, value_dtype: torch.dtype | None):
    """Yield (key, tensor, mask_or_None, store_dtype, encoding) for every entry of the state dict."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    masked = {f"{n}.weight" if n else "weight": f"{n}.mask" if n else "mask"
              for n, m in model.named_modules() if isinstance(m, MaskedLayer)}
    mask_keys = set(masked.values())
    for key, t in state.items():
        if key in mask_keys:
            continue
        cast = value_dtype is not None and t.is_floating_point() and (key in params or key in masked)
        store_dtype = value_dtype if cast else t.dtype
        if key not in masked:
            yield key, t, None, store_dtype, "dense"
            continue
        mask = state[masked[key]]
        numel, nnz = mask.numel(), int(mask.sum())
        rows = mask.reshape(mask.shape[0], -1)
        whole_rows = bool((rows.all(1) | ~rows.any(1)).all())
        costs = {"bitmask": math.ceil(numel / 8),
                 "index": nnz * torch.empty((), dtype=_index_dtype(numel)).element_size()}
        if whole_rows:
            costs["rows"] = math.ceil(mask.shape[0] / 8)
        yield key, t, mask, store_dtype, min(costs, key=costs.get)


def sparse_layout(model: nn.Module, dtype=None) -> SparseLayout:
    """Predict what :func:`save_sparse` writes for ``model`` (encodings and exact payload bytes)."""
    value_dtype = _value_dtype(dtype)
    tensors = []
    for key, t, mask, store_dtype, enc in _plan(model, value_dtype):
        item = torch.empty((), dtype=store_dtype).element_size()
        dense = t.numel() * t.element_size()
        if mask is None:
            tensors.append(TensorLayout(key, tuple(t.shape), _dtype_name(store_dtype), enc, t.numel(),
                                        t.numel() * item, dense))
            continue
        nnz = int(mask.sum())
        if enc == "bitmask":
            extra = math.ceil(mask.numel() / 8)
        elif enc == "index":
            extra = nnz * torch.empty((), dtype=_index_dtype(mask.numel())).element_size()
        else:
            extra = math.ceil(mask.shape[0] / 8)
        tensors.append(TensorLayout(key, tuple(t.shape), _dtype_name(store_dtype), enc, nnz,
                                    nnz * item + extra, dense))
    return SparseLayout(tensors, _dtype_name(value_dtype) if value_dtype is not None else "float32")


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n/8)], bit i of byte j = element 8*j + i."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:n].bool()


def save_sparse(model: nn.Module, path: str | os.PathLike, *, dtype=None, metadata: dict | None = None) -> SparseLayout:
    """Write ``model``'s state in the compressed ``dnr-sparse`` format (see the module docstring).

    Args:
        model: any model; masked layers are compressed, everything else is stored dense.
        path: output file (conventionally ``*.safetensors``); written atomically.
        dtype: None/"float32" (bit-exact), "float16" or "bfloat16" for the values and parameters.
        metadata: extra string-valued entries for the safetensors header.

    Returns:
        the :class:`SparseLayout` that was written (predicted sizes).
    """
    st = require("safetensors.torch", "save_sparse")
    value_dtype = _value_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for key, t, mask, store_dtype, enc in _plan(model, value_dtype):
        t = t.detach().cpu()
        entry = [list(t.shape), _dtype_name(t.dtype), enc]  # shape, dtype to restore, encoding
        if mask is None:
            tensors[key] = t.to(store_dtype).contiguous()
        else:
            mask = mask.detach().cpu().bool()
            tensors[key + _SEP + "values"] = t[mask].to(store_dtype).contiguous()
            if enc == "bitmask":
                tensors[key + _SEP + "bitmask"] = _pack_bits(mask)
            elif enc == "index":
                tensors[key + _SEP + "index"] = mask.reshape(-1).nonzero().flatten().to(_index_dtype(mask.numel()))
            else:
                tensors[key + _SEP + "rows"] = _pack_bits(mask.reshape(mask.shape[0], -1).any(1))
        layout[key] = entry
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT, "version": str(VERSION), "architecture": type(model).__name__,
                 "layout": json.dumps(layout, separators=(",", ":")), "sha256": tensors_sha256(tensors)})
    with atomic_path(path) as tmp:
        st.save_file(tensors, tmp, metadata=meta)
    return sparse_layout(model, dtype)


def read_sparse(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode a ``dnr-sparse`` file into a full state dict (masks included, float32 unless stored otherwise
    -- reduced-precision values are returned in the original dtype) and its metadata.

    Raises:
        SparseFormatError: unreadable/truncated file, another format, or a checksum mismatch.
    """
    st = require("safetensors", "read_sparse")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sparse file {path!r} does not exist")
    try:
        with st.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise SparseFormatError(f"{path!r} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    if meta.get("format") != FORMAT:
        raise SparseFormatError(f"{path!r} is not a {FORMAT} file (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise SparseFormatError(f"{path!r} has {FORMAT} version {meta.get('version')!r}; this dnr reads {VERSION}")
    if tensors_sha256(stored) != meta.get("sha256"):
        raise SparseFormatError(f"{path!r} is corrupt: the SHA-256 of its tensors does not match its header")
    try:
        layout = json.loads(meta["layout"])
        state = {}
        for key, (shape, dtype_name, enc) in layout.items():
            shape, dtype = tuple(shape), getattr(torch, dtype_name)
            if enc == "dense":
                state[key] = stored[key].to(dtype).reshape(shape)
                continue
            numel = math.prod(shape)
            if enc == "bitmask":
                mask = _unpack_bits(stored[key + _SEP + "bitmask"], numel)
            elif enc == "index":
                mask = torch.zeros(numel, dtype=torch.bool)
                mask[stored[key + _SEP + "index"].long()] = True
            elif enc == "rows":
                rows = _unpack_bits(stored[key + _SEP + "rows"], shape[0])
                mask = rows[:, None].expand(shape[0], numel // shape[0]).reshape(-1)
            else:
                raise SparseFormatError(f"{path!r}: unknown encoding {enc!r} for {key!r}")
            values = stored[key + _SEP + "values"]
            if values.numel() != int(mask.sum()):
                raise SparseFormatError(f"{path!r}: {key!r} has {values.numel()} values for {int(mask.sum())} "
                                        "mask positions")
            weight = torch.zeros(numel, dtype=dtype)
            weight[mask] = values.to(dtype)
            state[key] = weight.reshape(shape)
            state[key[: -len("weight")] + "mask"] = mask.reshape(shape).clone()
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, IndexError) as err:
        if isinstance(err, SparseFormatError):
            raise
        raise SparseFormatError(f"{path!r} has an inconsistent layout: {type(err).__name__}: {err}") from err
    return state, meta


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a ``dnr-sparse`` file into ``model`` (same architecture, same layers masked), in place.

    The file is fully decoded and checked against the model before anything is written, so an error
    leaves ``model`` untouched.

    Raises:
        SparseFormatError: corrupt file, or a model whose entries/shapes/masked layers differ (named).
    """
    state, meta = read_sparse(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    arch = meta.get("architecture")
    if missing or extra:
        hint = (f" ({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]})")
        masks = [k for k in missing + extra if k.endswith("mask")]
        why = " -- masked layers differ (sparsify the model the same way first)" if masks else ""
        raise SparseFormatError(f"{os.fspath(path)!r} (architecture {arch}) does not fit "
                                f"{type(model).__name__}: state dict keys differ{hint}{why}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise SparseFormatError(f"{os.fspath(path)!r} (architecture {arch}) does not fit {type(model).__name__}: "
                                    f"{k!r} has shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model")
    model.load_state_dict(state)
    return model


def save_dense(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the plain dense state (masks multiplied in and dropped) as safetensors; return the file size."""
    st = require("safetensors.torch", "save_dense")
    state = model.state_dict()
    masks = {f"{n}.weight" if n else "weight": f"{n}.mask" if n else "mask"
             for n, m in model.named_modules() if isinstance(m, MaskedLayer)}
    out = {}
    for k, v in state.items():
        if k in masks.values():
            continue
        v = v.detach().cpu()
        out[k] = (v * state[masks[k]].cpu() if k in masks else v).contiguous()
    st.save_file(out, os.fspath(path), metadata={"format": "dnr-dense", "architecture": type(model).__name__})
    return os.path.getsize(path)


def file_payload_bytes(path: str | os.PathLike) -> int:
    """Tensor bytes of a safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header
