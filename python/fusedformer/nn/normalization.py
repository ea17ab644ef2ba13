"""``LayerNorm`` and ``RMSNorm``: drop-ins for ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``.

Same constructor arguments, parameters and ``state_dict`` keys (they subclass the torch classes),
plus a ``backend=`` keyword. ``forward(input)`` is the torch call; keyword-only extras expose the
fused op's residual add and dropout::

    y = norm(x, residual=r, dropout_p=0.1)                        # norm(dropout(x) + r)
    y, s = norm(x, residual=r, dropout_p=0.1, return_residual=True)  # s = dropout(x) + r (pre-LN)

Dropout here is the caller's: it applies whenever ``dropout_p > 0`` (the module's ``training``
flag is not consulted, exactly as for ``torch.nn.functional.dropout(..., training=True)``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.layer_norm import rms_norm
from ._base import FusedModule, check_backend, match_residual, norm_weights, residual_layer_norm


class LayerNorm(FusedModule, nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by ``fusedformer.layer_norm``.

    Args: those of ``torch.nn.LayerNorm`` (``normalized_shape, eps=1e-5, elementwise_affine=True,
    bias=True, device=None, dtype=None``), and ``backend``: a backend name, or None to follow
    ``fusedformer.use_backend`` / ``FUSEDFORMER_BACKEND`` / automatic selection at call time.
    """

    _ff_torch_class = nn.LayerNorm

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor, *, residual: Optional[Tensor] = None, dropout_p: float = 0.0,
                return_residual: bool = False):
        return residual_layer_norm(self, input, residual, dropout_p, return_residual, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class RMSNorm(FusedModule, nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by ``fusedformer.rms_norm``.

    Args: those of ``torch.nn.RMSNorm`` (``normalized_shape, eps=None, elementwise_affine=True,
    device=None, dtype=None``; ``eps=None`` means ``torch.finfo(input.dtype).eps``) and ``backend``.
    """

    _ff_torch_class = nn.RMSNorm

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor, *, residual: Optional[Tensor] = None, dropout_p: float = 0.0,
                return_residual: bool = False):
        x, residual = match_residual(input, residual)
        weight, _ = norm_weights(self, x)
        return rms_norm(x, self.normalized_shape, weight, self.eps, residual=residual,
                        dropout_p=dropout_p, return_residual=return_residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
