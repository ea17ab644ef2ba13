"""What ``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` share: their fused children
(attentions and LayerNorms, converted and reverted with the layer, and following its ``backend``),
and the three steps of their forwards — a residual LayerNorm, an attention call, the feed-forward.

A layer class names its children in ``_ff_attentions`` / ``_ff_norms`` and the dropout after its
feed-forward in ``_ff_final_dropout`` (``dropout2`` in the encoder, ``dropout3`` in the decoder);
``fusedformer.integrations.torch_nn`` reads the same names to decide whether a torch layer converts.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FusedModule, check_backend, dropout_p, gelu_approximation, linear_gelu_linear, residual_layer_norm
from .attention import MultiheadAttention
from .normalization import LayerNorm


class FusedTransformerLayer(FusedModule):
    """Mixin of the fused torch Transformer layers (see the module docstring)."""

    _ff_attributes = ("_ff_backend",)
    _ff_attentions: tuple[str, ...] = ()
    _ff_norms: tuple[str, ...] = ()
    _ff_final_dropout: str = ""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        # the torch layer's constructor (encoder and decoder take the same arguments), then the children
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                         layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        self._adopt_children(backend)

    # -- conversion ------------------------------------------------------------------------------
    def _children(self) -> list:
        return [getattr(self, n) for n in self._ff_attentions + self._ff_norms]

    def _adopt_children(self, backend: Optional[str]) -> None:
        for name in self._ff_attentions + self._ff_norms:
            child = getattr(self, name)
            cls = MultiheadAttention if name in self._ff_attentions else LayerNorm
            if type(child) is cls._ff_torch_class:
                cls._ff_adopt(child, backend)
        self.backend = backend

    @classmethod
    def _ff_adopt(cls, module: nn.Module, backend: Optional[str]) -> nn.Module:
        module.__class__ = cls
        module._adopt_children(backend)
        return module

    def _ff_release(self) -> nn.Module:
        for child in self._children():
            if isinstance(child, FusedModule):
                child._ff_release()
        return super()._ff_release()

    @property
    def backend(self) -> Optional[str]:
        return self._ff_backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        value = check_backend(value)
        self.__dict__["_ff_backend"] = value
        for child in self._children():
            if isinstance(child, FusedModule):
                child.backend = value

    # -- forward steps ---------------------------------------------------------------------------
    def _norm(self, norm: nn.Module, x: Tensor, residual: Optional[Tensor] = None, p: float = 0.0,
              return_residual: bool = False):
        """``norm(dropout(x) + residual)`` in one fused call (``norm`` one of the layer's norms)."""
        return residual_layer_norm(norm, x, residual, p, return_residual, self.backend)

    @staticmethod
    def _attend(attn: nn.Module, x: Tensor, kv: Tensor, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                is_causal: bool) -> Tensor:
        return attn(x, kv, kv, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False,
                    is_causal=is_causal)[0]

    def _feed_forward(self, x: Tensor, final_dropout: bool) -> Tensor:
        """``linear2(dropout(activation(linear1(x))))``, then the final dropout if ``final_dropout``:
        one ``gelu_ffn`` call when the activation is a GELU and the inner dropout is inactive."""
        final = getattr(self, self._ff_final_dropout)
        approximate = gelu_approximation(self.activation)
        if approximate is not None and dropout_p(self.dropout, self.training) == 0.0:
            p = dropout_p(final, self.training) if final_dropout else 0.0
            return linear_gelu_linear(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                      self.linear2.bias, approximate, p, self.backend)
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return final(y) if final_dropout else y

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.backend!r}"
