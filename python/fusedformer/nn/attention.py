"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on ``fusedformer.attention``.

Same constructor arguments, parameters and ``state_dict`` keys (it subclasses the torch class),
plus ``backend=``. ``forward`` takes the torch arguments with the torch conventions:

* ``batch_first`` (B, S, E) or sequence-first (S, B, E) inputs, or unbatched (S, E);
* ``key_padding_mask`` (B, S): bool (True = ignore that key) or additive float;
* ``attn_mask`` (L, S) or (B * num_heads, L, S): bool (**True = not allowed**, the opposite of
  SDPA's convention) or additive float;
* ``is_causal``: a causal mask. torch treats it as a *hint* that ``attn_mask`` is causal and
  requires the mask; here the causal mask is always applied, and combined with ``attn_mask`` when
  one is given (identical when the hint is true), so ``attn_mask`` may be omitted;
* ``need_weights`` / ``average_attn_weights``: the attention probabilities are returned as torch
  returns them (after dropout, averaged over heads by default). The fused kernel never forms them,
  so they are computed separately in plain PyTorch — pass ``need_weights=False`` (as
  ``nn.TransformerEncoderLayer`` does) for the fast path;
* ``add_bias_kv``, ``add_zero_attn``, ``kdim`` / ``vdim`` and ``bias=False`` behave as in torch.

Differences from torch: a query row whose every key is masked gives 0 here (torch gives NaN), and
attention dropout uses the project's counter-based RNG (``fusedformer.rng``), not torch's.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference, rng
from ..ops.attention import attention
from ._base import FusedModule, check_backend, dropout_p as _dropout_p
from ..errors import InputError, InputTypeError


def _to_heads(x: Tensor, batch_first: bool, num_heads: int) -> Tensor:
    """(B, S, H*D) [batch_first] or (S, B, H*D) -> a (B, H, S, D) view (no copy)."""
    if batch_first:
        B, S, E = x.shape
        return x.view(B, S, num_heads, E // num_heads).transpose(1, 2)
    S, B, E = x.shape
    return x.view(S, B, num_heads, E // num_heads).permute(1, 2, 0, 3)


def _from_heads(o: Tensor, batch_first: bool) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D) [batch_first] or (L, B, H*D)."""
    B, H, L, D = o.shape
    if batch_first:
        return o.transpose(1, 2).reshape(B, L, H * D)
    return o.permute(2, 0, 1, 3).reshape(L, B, H * D)


def _append_key_column(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key (a learned bias or zero key) that every query may attend: pad masks with an
    'allowed' column (False in torch's bool convention, 0 when additive)."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


def sdpa_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int,
               S: int, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """torch MHA masks -> ``fusedformer.attention`` masks.

    In: ``attn_mask`` (L, S) or (B*H, L, S), bool True = blocked, or additive; ``key_padding_mask``
    (B, S), bool True = padding, or additive. Out: ``attn_mask`` broadcastable to (B, H, L, S), bool
    True = *may attend* or additive in ``dtype``; ``key_padding_mask`` (B, S) bool or None."""
    op = "MultiheadAttention"
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise InputTypeError(f"{op}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (L, S):
                raise InputError(f"{op}: 2-D attn_mask has shape {tuple(attn_mask.shape)}; expected (L, S) = {(L, S)}")
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (B * H, L, S):
                raise InputError(f"{op}: 3-D attn_mask has shape {tuple(attn_mask.shape)}; expected "
                                 f"(batch * num_heads, L, S) = {(B * H, L, S)}")
            attn_mask = attn_mask.view(B, H, L, S)
        else:
            raise InputError(f"{op}: attn_mask must be 2-D (L, S) or 3-D (batch * num_heads, L, S); got "
                             f"shape {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
        elif attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        else:
            raise InputTypeError(f"{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise InputTypeError(f"{op}: key_padding_mask must be a tensor or None, got {type(key_padding_mask).__name__}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise InputError(f"{op}: key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected "
                             f"(batch, S) = {(B, S)}")
        if key_padding_mask.is_floating_point():
            # additive padding: fold it into attn_mask
            additive = key_padding_mask.to(dtype)[:, None, None, :]
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
                    ~attn_mask, float("-inf"))
            attn_mask = additive if attn_mask is None else attn_mask + additive
            key_padding_mask = None
        elif key_padding_mask.dtype != torch.bool:
            raise InputTypeError(f"{op}: key_padding_mask must be bool or floating point, got {key_padding_mask.dtype}")
    return attn_mask, key_padding_mask


def attention_probabilities(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                            is_causal: bool, scale: float, p: float, seed: Optional[Tensor]) -> Tensor:
    """The (B, H, L, S) attention probabilities ``fusedformer.attention`` uses (the reference's,
    same masks, same dropout mask from ``seed``), for ``need_weights=True``. Rows with every key
    masked are 0."""
    probs = reference.attention_probabilities(q, k, attn_mask, key_padding_mask, is_causal, scale)
    if p > 0.0:
        probs = probs * rng.dropout_multiplier(probs.shape, p, int(seed.reshape(-1)[0]), 0,
                                               device=probs.device, dtype=probs.dtype)
    return probs.to(q.dtype)


class MultiheadAttention(FusedModule, nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by ``fusedformer.attention``.

    Args: those of ``torch.nn.MultiheadAttention`` (``embed_dim, num_heads, dropout=0.0, bias=True,
    add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
    dtype=None``) and ``backend`` (None = follow ``use_backend`` / env / automatic at call time).
    See the module docstring for the (few) behavioural differences.
    """

    _ff_torch_class = nn.MultiheadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections, in the input's layout: (B, S, E) or (S, B, E)."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            b = self.in_proj_bias
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            b = self.in_proj_bias
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        op = "MultiheadAttention"
        if query.is_nested or key.is_nested or value.is_nested:
            raise InputError(f"{op}: nested tensors are not supported by the fused module; pad the batch "
                             "and pass key_padding_mask instead")
        batched = query.dim() == 3
        if not batched:
            if query.dim() != 2 or key.dim() != 2 or value.dim() != 2:
                raise InputError(f"{op}: expected 3-D (batched) or 2-D (unbatched) query, key and value; got "
                                 f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
            bdim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(bdim), key.unsqueeze(bdim), value.unsqueeze(bdim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif key.dim() != 3 or value.dim() != 3:
            raise InputError(f"{op}: query is 3-D but key / value have shapes {tuple(key.shape)}, {tuple(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise InputError(f"{op}: query's last dimension is {query.shape[-1]}; expected embed_dim {self.embed_dim}")
        if key.shape[:-1] != value.shape[:-1]:
            raise InputError(f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch and "
                             "sequence length")

        H = self.num_heads
        q, k, v = (_to_heads(t, self.batch_first, H) for t in self._project(query, key, value))
        B, _, L, D = q.shape
        S = k.shape[2]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, D).expand(B, H, 1, D).to(k.dtype)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, D).expand(B, H, 1, D).to(v.dtype)], dim=2)
            attn_mask, key_padding_mask = _append_key_column(attn_mask), _append_key_column(key_padding_mask)
            S += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
            attn_mask, key_padding_mask = _append_key_column(attn_mask), _append_key_column(key_padding_mask)
            S += 1
        mask, kpm = sdpa_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)

        p = _dropout_p(self.dropout, self.training)
        seed = rng.new_seed() if p > 0.0 else None
        scale = 1.0 / math.sqrt(D)
        out = attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=bool(is_causal), scale=scale,
                        key_padding_mask=kpm, seed=seed, backend=self.backend)
        out = F.linear(_from_heads(out, self.batch_first), self.out_proj.weight, self.out_proj.bias)

        weights = None
        if need_weights:
            weights = attention_probabilities(q, k, mask, kpm, bool(is_causal), scale, p, seed)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
