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

from torch import Tensor, nn

from ._base import dropout_p
from ._layer import FusedTransformerLayer


class TransformerDecoderLayer(FusedTransformerLayer, nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fused kernels.

    Args: those of ``torch.nn.TransformerDecoderLayer`` (``d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=F.relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None``) and ``backend`` (None = follow ``use_backend`` / env /
    automatic at call time; setting ``layer.backend`` also sets it on the attentions and norms).
    """

    _ff_torch_class = nn.TransformerDecoderLayer
    _ff_attentions = ("self_attn", "multihead_attn")
    _ff_norms = ("norm1", "norm2", "norm3")
    _ff_final_dropout = "dropout3"

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
