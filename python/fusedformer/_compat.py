"""The private or version-dependent torch APIs fusedformer relies on, in one place."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_bias(attn_mask) -> Optional[tuple[bool, int, int]]:
    """For a ``torch.nn.attention.bias.CausalBias`` mask (``causal_upper_left`` /
    ``causal_lower_right``): ``(lower_right, seq_len_q, seq_len_kv)``; None for any other mask.

    Such a mask is a tensor subclass whose storage holds nothing: SDPA reads its variant, never
    its values, and so must we."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # torch without it: no such masks can be passed
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return attn_mask.variant == CausalVariant.LOWER_RIGHT, attn_mask.seq_len_q, attn_mask.seq_len_kv


def lower_right_causal_mask(seq_len_q: int, seq_len_kv: int, device) -> Tensor:
    """The bool (Sq, Sk) mask of bottom-right aligned causal attention (True = may attend):
    query i sees keys j <= i + Sk - Sq."""
    return torch.ones(seq_len_q, seq_len_kv, dtype=torch.bool, device=device).tril(diagonal=seq_len_kv - seq_len_q)


def known_zero(n) -> bool:
    """``n == 0`` for a size that may be symbolic: False unless it is known to be 0 (an unbacked
    size under torch.export is not guarded on)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return guard_or_false(n == 0)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the dispatcher has a kernel for ``op`` (``"aten::linear"``, ``"fusedformer_C::..."``)
    under ``dispatch_key`` (``"CPU"``, ``"AutocastCUDA"``, ...); False for an op or key this torch
    does not know."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
    except RuntimeError:
        return False


def in_dispatch_mode_or_transform() -> bool:
    """Whether a torch dispatch mode (fake tensors, make_fx, FlopCounterMode, ...) or a torch.func
    transform is active: such calls must go through the registered custom ops."""
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def cpu_capability_map() -> dict:
    """torch's map of the CPU's capabilities (ISA flags, model name); {} where this torch has none."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError, TypeError):
        return {}
