"""``TransformerEncoderLayer``: a drop-in for ``torch.nn.TransformerEncoderLayer`` on the fused ops.

Same constructor arguments, submodules, parameters and ``state_dict`` keys (it subclasses the
torch class; ``self_attn`` is a :class:`fusedformer.nn.MultiheadAttention`, ``norm1`` / ``norm2``
are :class:`fusedformer.nn.LayerNorm`), plus ``backend=``. What is fused:

post-LN (``norm_first=False``)::

    x = layer_norm(sa(x), residual=x, dropout_p=p1)          # norm1(x + dropout1(sa(x)))
    x = layer_norm(ff(x), residual=x, dropout_p=p2)          # norm2(x + dropout2(ff(x)))

pre-LN (``norm_first=True``)::

    h = layer_norm(x)                                        # norm1(x)
    h, s = layer_norm(sa(h), residual=x, dropout_p=p1, return_residual=True)
                                                             # s = x + dropout1(sa(h)); h = norm2(s)
    x = s + gelu_ffn(h, dropout_p=p2)                        # s + dropout2(ff(h))

``sa`` is ``fusedformer.attention`` (attention dropout inside). ``ff`` is ``fusedformer.gelu_ffn``
when the activation is a GELU (``'gelu'``, ``F.gelu``, ``nn.GELU``) and the dropout *between*
the two linears (``self.dropout``) is inactive (p = 0 or eval mode); otherwise (ReLU, other
callables, or that inner dropout in training) the feed-forward runs as the plain torch ops, with
torch's own dropout for the unfused dropouts.

Dropout in the fused ops follows ``fusedformer.rng``: each fused call draws a fresh seed from
torch's default generator, so ``torch.manual_seed`` makes training runs repeatable and every
backend sees the same masks.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FusedModule, check_backend, dropout_p, gelu_approximation, linear_gelu_linear, residual_layer_norm
from .attention import MultiheadAttention
from .normalization import LayerNorm


class TransformerEncoderLayer(FusedModule, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fused kernels.

    Args: those of ``torch.nn.TransformerEncoderLayer`` (``d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=F.relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None``) and ``backend`` (None = follow ``use_backend`` / env /
    automatic at call time; setting ``layer.backend`` also sets it on ``self_attn``, ``norm1``, ``norm2``).
    """

    _ff_torch_class = nn.TransformerEncoderLayer
    _ff_attributes = ("_ff_backend",)

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                         layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        self._adopt_children(backend)

    # -- conversion ------------------------------------------------------------------------------
    def _adopt_children(self, backend: Optional[str]) -> None:
        for child, cls in ((self.self_attn, MultiheadAttention), (self.norm1, LayerNorm), (self.norm2, LayerNorm)):
            if type(child) is cls._ff_torch_class:
                cls._ff_adopt(child, backend)
        self.backend = backend

    @classmethod
    def _ff_adopt(cls, module: nn.Module, backend: Optional[str]) -> nn.Module:
        module.__class__ = cls
        module._adopt_children(backend)
        return module

    def _ff_release(self) -> nn.Module:
        for child in (self.self_attn, self.norm1, self.norm2):
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
        for child in (self.self_attn, self.norm1, self.norm2):
            if isinstance(child, FusedModule):
                child.backend = value

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            # nn.TransformerEncoder's inference fast path packs padded batches into nested tensors;
            # the fused kernels take padded tensors, so torch's own kernels run this one.
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        p1 = dropout_p(self.dropout1, self.training)
        if self.norm_first:
            h = self._norm(self.norm1, x)
            a = self._self_attention(h, src_mask, src_key_padding_mask, is_causal)
            h, x = self._norm(self.norm2, a, residual=x, p=p1, return_residual=True)
            return x + self._feed_forward(h, final_dropout=True)
        a = self._self_attention(x, src_mask, src_key_padding_mask, is_causal)
        x = self._norm(self.norm1, a, residual=x, p=p1)
        f = self._feed_forward(x, final_dropout=False)
        return self._norm(self.norm2, f, residual=x, p=dropout_p(self.dropout2, self.training))

    def _norm(self, norm: nn.Module, x: Tensor, residual: Optional[Tensor] = None, p: float = 0.0,
              return_residual: bool = False):
        """``norm(dropout(x) + residual)`` in one fused call (``norm`` is norm1 or norm2)."""
        return residual_layer_norm(norm, x, residual, p, return_residual, self.backend)

    def _self_attention(self, x: Tensor, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                        is_causal: bool) -> Tensor:
        return self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]

    def _feed_forward(self, x: Tensor, final_dropout: bool) -> Tensor:
        """``linear2(dropout(activation(linear1(x))))``, then ``dropout2`` if ``final_dropout``."""
        approximate = gelu_approximation(self.activation)
        p_inner = dropout_p(self.dropout, self.training)
        if approximate is not None and p_inner == 0.0:
            p2 = dropout_p(self.dropout2, self.training) if final_dropout else 0.0
            return linear_gelu_linear(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                      self.linear2.bias, approximate, p2, self.backend)
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(y) if final_dropout else y

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.backend!r}"
