"""``GeluFFN``: the Transformer feed-forward block as one module on ``fusedformer.gelu_ffn``.

    y = dropout(linear2(gelu(linear1(x))))

torch has no single module for this; the parameters are two ``nn.Linear`` submodules named
``linear1`` and ``linear2`` (the names ``nn.TransformerEncoderLayer`` uses), so a ``state_dict``
with keys ``linear1.weight``, ``linear1.bias``, ``linear2.weight``, ``linear2.bias`` loads into it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.gelu_ffn import APPROXIMATIONS
from ._base import FusedModule, check_backend, dropout_p as _dropout_p, linear_gelu_linear
from ..errors import InputError


class GeluFFN(FusedModule, nn.Module):
    """``Linear(in_features, hidden_features) -> GELU -> Linear(hidden_features, out_features) -> Dropout``.

    Args:
        in_features: input width C.
        hidden_features: feed-forward width F.
        out_features: output width (default ``in_features``).
        bias: whether both linears have a bias.
        approximate: ``'none'`` (exact erf GELU, BERT) or ``'tanh'`` (GPT-2's ``gelu_new``).
        dropout: dropout probability on the output, applied in training mode (``fusedformer.rng``).
        device, dtype: as for ``nn.Linear``.
        backend: a backend name, or None to follow ``use_backend`` / env / automatic at call time.
    """

    # GeluFFN has no torch counterpart: revert() leaves it as it is.
    _ff_torch_class = None

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 bias: bool = True, approximate: str = "none", dropout: float = 0.0, device=None, dtype=None,
                 *, backend: Optional[str] = None):
        super().__init__()
        if approximate not in APPROXIMATIONS:
            raise InputError(f"GeluFFN: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise InputError(f"GeluFFN: dropout must be in [0, 1), got {dropout}")
        out_features = in_features if out_features is None else out_features
        self.linear1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.linear2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate
        self.dropout = float(dropout)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return linear_gelu_linear(input, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                  self.linear2.bias, self.approximate, _dropout_p(self.dropout, self.training),
                                  self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, dropout={self.dropout}, backend={self.backend!r}"
