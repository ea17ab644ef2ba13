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

from torch import Tensor, nn

from ._base import dropout_p
from ._layer import FusedTransformerLayer


class TransformerEncoderLayer(FusedTransformerLayer, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fused kernels.

    Args: those of ``torch.nn.TransformerEncoderLayer`` (``d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=F.relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None``) and ``backend`` (None = follow ``use_backend`` / env /
    automatic at call time; setting ``layer.backend`` also sets it on ``self_attn``, ``norm1``, ``norm2``).
    """

    _ff_torch_class = nn.TransformerEncoderLayer
    _ff_attentions = ("self_attn",)
    _ff_norms = ("norm1", "norm2")
    _ff_final_dropout = "dropout2"

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
            a = self._attend(self.self_attn, h, h, src_mask, src_key_padding_mask, is_causal)
            h, x = self._norm(self.norm2, a, residual=x, p=p1, return_residual=True)
            return x + self._feed_forward(h, final_dropout=True)
        a = self._attend(self.self_attn, x, x, src_mask, src_key_padding_mask, is_causal)
        x = self._norm(self.norm1, a, residual=x, p=p1)
        f = self._feed_forward(x, final_dropout=False)
        return self._norm(self.norm2, f, residual=x, p=dropout_p(self.dropout2, self.training))
