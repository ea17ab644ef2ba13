"""``TransformerDecoderLayer``: a drop-in for ``torch.nn.TransformerDecoderLayer`` on the fused ops.

Same constructor arguments, submodules, parameters and ``state_dict`` keys (it subclasses the
torch class; ``self_attn`` and ``multihead_attn`` are :class:`fusedformer.nn.MultiheadAttention`,
``norm1`` … ``norm3`` are :class:`fusedformer.nn.LayerNorm`), plus ``backend=``. What is fused:

post-LN (``norm_first=False``)::

    x = layer_norm(sa(x), residual=x, dropout_p=p1)              # norm1(x + dropout1(sa(x)))
    x = layer_norm(ca(x, memory), residual=x, dropout_p=p2)      # norm2(x + dropout2(ca(x, memory)))
    x = layer_norm(ff(x), residual=x, dropout_p=p3)              # norm3(x + dropout3(ff(x)))

pre-LN (``norm_first=True``)::

    h = layer_norm(x)                                            # norm1(x)
    h, x = layer_norm(sa(h), residual=x, dropout_p=p1, return_residual=True)   # x += dropout1(sa); h = norm2(x)
    h, x = layer_norm(ca(h, memory), residual=x, dropout_p=p2, return_residual=True)
    x = x + gelu_ffn(h, dropout_p=p3)                            # x + dropout3(ff(norm3(x)))

``sa`` is causal self-attention when ``tgt_is_causal`` (or with ``tgt_mask``), ``ca`` the
cross-attention over ``memory``: queries of the target length, keys of the memory length, with
``memory_key_padding_mask`` as the kernel's key padding mask. Both are ``fusedformer.attention``
(through :class:`fusedformer.nn.MultiheadAttention`, attention dropout inside). ``ff`` is
``fusedformer.gelu_ffn`` when the activation is a GELU and the dropout *between* the linears is
inactive (p = 0 or eval mode); otherwise the feed-forward runs as the plain torch ops.

As in :class:`fusedformer.nn.MultiheadAttention`, ``tgt_is_causal`` / ``memory_is_causal`` always
apply a causal mask (torch treats them as hints that the given mask is causal; identical when the
hint is true).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FusedModule, check_backend, dropout_p, gelu_approximation, linear_gelu_linear, residual_layer_norm
from .attention import MultiheadAttention
from .normalization import LayerNorm

_ATTENTIONS = ("self_attn", "multihead_attn")
_NORMS = ("norm1", "norm2", "norm3")


class TransformerDecoderLayer(FusedModule, nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fused kernels.

    Args: those of ``torch.nn.TransformerDecoderLayer`` (``d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=F.relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None``) and ``backend`` (None = follow ``use_backend`` / env /
    automatic at call time; setting ``layer.backend`` also sets it on the attentions and norms).
    """

    _ff_torch_class = nn.TransformerDecoderLayer
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
    def _children(self):
        return [getattr(self, n) for n in _ATTENTIONS + _NORMS]

    def _adopt_children(self, backend: Optional[str]) -> None:
        for name in _ATTENTIONS + _NORMS:
            child = getattr(self, name)
            cls = MultiheadAttention if name in _ATTENTIONS else LayerNorm
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

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        if tgt.is_nested or memory.is_nested:
            return super().forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                   memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        x = tgt
        p1 = dropout_p(self.dropout1, self.training)
        p2 = dropout_p(self.dropout2, self.training)
        if self.norm_first:
            h = self._norm(self.norm1, x)
            a = self._attend(self.self_attn, h, h, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = self._norm(self.norm2, a, residual=x, p=p1, return_residual=True)
            c = self._attend(self.multihead_attn, h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = self._norm(self.norm3, c, residual=x, p=p2, return_residual=True)
            return x + self._feed_forward(h, final_dropout=True)
        a = self._attend(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = self._norm(self.norm1, a, residual=x, p=p1)
        c = self._attend(self.multihead_attn, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = self._norm(self.norm2, c, residual=x, p=p2)
        f = self._feed_forward(x, final_dropout=False)
        return self._norm(self.norm3, f, residual=x, p=dropout_p(self.dropout3, self.training))

    def _norm(self, norm: nn.Module, x: Tensor, residual: Optional[Tensor] = None, p: float = 0.0,
              return_residual: bool = False):
        return residual_layer_norm(norm, x, residual, p, return_residual, self.backend)

    @staticmethod
    def _attend(attn: nn.Module, x: Tensor, kv: Tensor, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                is_causal: bool) -> Tensor:
        return attn(x, kv, kv, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False,
                    is_causal=is_causal)[0]

    def _feed_forward(self, x: Tensor, final_dropout: bool) -> Tensor:
        """``linear2(dropout(activation(linear1(x))))``, then ``dropout3`` if ``final_dropout``."""
        approximate = gelu_approximation(self.activation)
        if approximate is not None and dropout_p(self.dropout, self.training) == 0.0:
            p3 = dropout_p(self.dropout3, self.training) if final_dropout else 0.0
            return linear_gelu_linear(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                      self.linear2.bias, approximate, p3, self.backend)
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout3(y) if final_dropout else y

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.backend!r}"


def conversion_unsupported(layer: nn.TransformerDecoderLayer) -> Optional[str]:
    """Why ``fusedformer.convert`` must leave this ``nn.TransformerDecoderLayer`` as it is, or None."""
    for name in _ATTENTIONS:
        attn = getattr(layer, name)
        if type(attn) not in (nn.MultiheadAttention, MultiheadAttention):
            return f"{name} is a {type(attn).__qualname__}, not nn.MultiheadAttention"
    for name in _NORMS:
        norm = getattr(layer, name)
        if type(norm) not in (nn.LayerNorm, LayerNorm):
            return f"{name} is a {type(norm).__qualname__}, not nn.LayerNorm"
    return None


def conversion_notes(layer: nn.TransformerDecoderLayer) -> list:
    if gelu_approximation(layer.activation) is None:
        act = getattr(layer.activation, "__name__", type(layer.activation).__name__)
        return [f"activation {act} is not a GELU: the feed-forward runs as plain torch ops "
                "(attention and the residual/dropout/LayerNorm steps are fused)"]
    if layer.dropout.p > 0.0:
        return [f"in training, the dropout between linear1 and linear2 (p={layer.dropout.p}) keeps the "
                "feed-forward unfused; in eval mode it is one gelu_ffn call"]
    return []
