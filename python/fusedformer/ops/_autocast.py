"""Autocast for the fused ops: each follows torch's autocast policy for the aten op it stands for.

``torch.autocast`` acts in the dispatcher, on aten ops. The fused ops reach their kernels either
through ``torch.library`` custom ops (traced calls) or straight through an autograd Function (eager
calls, ``_common.FusedOp``); neither has an autocast kernel, so the public functions cast their
inputs themselves, before choosing a backend, the same way on both call paths:

========== ======================================= ============================================
op         stands for (torch's policy)             under autocast(device, dtype)
========== ======================================= ============================================
gelu_ffn   two ``F.linear`` (lower precision)      x, w1, b1, w2, b2 cast to ``dtype``; GELU and
                                                   output in ``dtype``, as linear -> gelu -> linear
attention  ``F.scaled_dot_product_attention``      q, k, v and a floating attn_mask cast to
           (lower precision)                       ``dtype``; output in ``dtype``
layer_norm ``F.layer_norm`` / ``F.rms_norm``       cast to float32 where torch's policy has them in
                                                   its float32 list (CUDA, XPU, MPS); untouched on
                                                   the CPU, where torch leaves them out of autocast
                                                   (a bfloat16 input stays bfloat16, float32 weights
                                                   beside it)
========== ======================================= ============================================

Which devices apply a policy to an aten op is read from torch's own registrations (an Autocast<device>
kernel for that op), once, at import, so the fused ops change when torch's policy does. As in
torch, only floating tensors other than float64 on the autocast device are cast; casting is
differentiable, so float32 parameters get float32 gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _compat

# torch's autocast dispatch key per device type.
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}
LINEAR, SDPA, LAYER_NORM, RMS_NORM = ("aten::linear", "aten::scaled_dot_product_attention", "aten::layer_norm",
                                      "aten::rms_norm")


def _registered(op: str, key: str) -> bool:
    return _compat.has_kernel(op, key)


# (aten op, device type) -> whether torch's autocast casts that op's inputs on that device.
_POLICY = {(op, dev): _registered(op, key) for op in (LINEAR, SDPA, LAYER_NORM, RMS_NORM) for dev, key in _KEYS.items()}


def torch_casts(op: str, device_type: str) -> bool:
    """Whether torch's autocast has a policy for the aten ``op`` on ``device_type``."""
    return _POLICY.get((op, device_type), False)


def _cast(tensors: tuple, device_type: str, dtype: torch.dtype) -> tuple:
    def one(t):
        if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype
                and t.device.type == device_type):
            return t.to(dtype)
        return t
    return tuple(one(t) for t in tensors)


def _device_type(tensors: tuple) -> Optional[str]:
    for t in tensors:
        if isinstance(t, Tensor):
            return t.device.type
    return None


def lower_precision(op: str, *tensors):
    """``tensors`` as torch's lower-precision autocast policy for ``op`` would pass them on: cast to
    the autocast dtype when autocast is on for their device and torch applies it to ``op`` there."""
    device_type = _device_type(tensors)
    if device_type is None or not torch.is_autocast_enabled(device_type) or not torch_casts(op, device_type):
        return tensors
    return _cast(tensors, device_type, torch.get_autocast_dtype(device_type))


def float32(op: str, *tensors):
    """``tensors`` as torch's float32 autocast policy for ``op`` would pass them on."""
    device_type = _device_type(tensors)
    if device_type is None or not torch.is_autocast_enabled(device_type) or not torch_casts(op, device_type):
        return tensors
    return _cast(tensors, device_type, torch.float32)
