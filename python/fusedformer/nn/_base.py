"""What every fused module shares: the backend it remembers, and the way back to its torch class.

Conversion works by *class swapping*: a fused module class subclasses the class it replaces
(``fusedformer.nn.LayerNorm`` subclasses ``torch.nn.LayerNorm``; the Hugging Face layer classes in
``fusedformer.integrations`` subclass ``BertLayer`` / ``GPT2Block``) and overrides only ``forward``.
Converting a module sets its ``__class__`` to the fused subclass; reverting sets it back. The
module object, its parameters, buffers, hooks, submodules and ``state_dict`` keys never change,
so a checkpoint saved from either loads into the other and ``isinstance`` checks written against
the torch class keep working.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..ops.gelu_ffn import gelu_ffn
from ..ops.layer_norm import layer_norm


def check_backend(backend: Optional[str]) -> Optional[str]:
    """Validate a module's ``backend=`` argument early (``None`` = follow ``use_backend`` / env),
    by the one rule of ``backends.check_name``."""
    return None if backend is None else backends.check_name(backend, "backend=")


class FusedModule:
    """Mixin for fused modules. ``_ff_torch_class`` is the class the module reverts to.

    Subclasses list the instance attributes they add (beyond the torch class's) in
    ``_ff_attributes``; :meth:`_ff_adopt` sets them on a converted module and :meth:`_ff_release`
    removes them on revert.
    """

    _ff_torch_class: type = nn.Module
    _ff_attributes: tuple[str, ...] = ("backend",)

    @classmethod
    def _ff_adopt(cls, module: nn.Module, backend: Optional[str]) -> nn.Module:
        """Turn an instance of ``cls._ff_torch_class`` into an instance of ``cls``, in place."""
        module.__class__ = cls
        module.backend = check_backend(backend)
        return module

    def _ff_release(self) -> nn.Module:
        """Turn this module back into an instance of its torch class, in place."""
        for name in type(self)._ff_attributes:
            self.__dict__.pop(name, None)
        self.__class__ = type(self)._ff_torch_class
        return self


def dropout_p(module_or_p, training: bool) -> float:
    """The dropout probability in effect: ``p`` of an ``nn.Dropout`` (or a float) while training, else 0."""
    if isinstance(module_or_p, nn.Dropout):
        return float(module_or_p.p) if module_or_p.training else 0.0
    return float(module_or_p) if training else 0.0


def gelu_approximation(fn: Callable) -> Optional[str]:
    """``'none'`` or ``'tanh'`` if ``fn`` is a GELU that ``gelu_ffn`` computes exactly, else None.

    Recognised: ``F.gelu``, ``nn.GELU(approximate=...)`` and ``functools.partial(F.gelu, approximate=...)``.
    """
    if fn is F.gelu:
        return "none"
    if type(fn) is nn.GELU:
        return fn.approximate if fn.approximate in ("none", "tanh") else None
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args \
            and set(fn.keywords) <= {"approximate"}:
        approx = fn.keywords.get("approximate", "none")
        return approx if approx in ("none", "tanh") else None
    return None


def match_residual(x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Give ``x`` and ``residual`` one dtype (the promoted one), as ``x + residual`` would."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def norm_weights(norm: nn.Module, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The (weight, bias) of a LayerNorm-like module, cast to ``x``'s dtype unless they are float32
    (the fused op takes float32 parameters beside low-precision activations)."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)

    def cast(t):
        if t is None or t.dtype in (x.dtype, torch.float32):
            return t
        return t.to(x.dtype)

    w, b = cast(w), cast(b)
    if w is not None and b is not None and w.dtype != b.dtype:
        b = b.to(w.dtype)
    return w, b


def residual_layer_norm(norm: nn.Module, x: Tensor, residual: Optional[Tensor] = None, p: float = 0.0,
                        return_residual: bool = False, backend: Optional[str] = None):
    """``norm(dropout(x, p) + residual)`` in one ``fusedformer.layer_norm`` call, with the
    parameters and ``eps`` of the LayerNorm module ``norm`` (``return_residual`` as for the op)."""
    x, residual = match_residual(x, residual)
    w, b = norm_weights(norm, x)
    return layer_norm(x, norm.normalized_shape, w, b, norm.eps, residual=residual, dropout_p=p,
                      return_residual=return_residual, backend=backend)


def linear_gelu_linear(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                       approximate: str, p: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """``dropout(gelu(x w1^T + b1) w2^T + b2)`` in one ``fusedformer.gelu_ffn`` call (``nn.Linear``
    weight layout). Under autocast, ``gelu_ffn`` casts its inputs as ``F.linear``'s are
    (``ops/_autocast.py``)."""
    return gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, dropout_p=p, backend=backend)
