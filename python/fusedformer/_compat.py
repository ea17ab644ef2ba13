"""The private or version-dependent torch APIs fusedformer relies on, in one place.

Nothing else in the project — the package, ``bench/``, ``scripts/`` — names a private torch module
or attribute (``torch._C``, ``torch._dynamo``, a ``_``-prefixed name anywhere under ``torch``);
``tests/test_compat.py`` reads their sources and fails if one does. Each function here says which
torch versions it was written for and why no public API does the job."""
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


def mark_dynamo_constant(fn):
    """What ``torch._dynamo.assume_constant_result`` does (torch 2.0 - 2.x: it sets the attribute
    ``_dynamo_marked_constant``; Dynamo then calls the function once at trace time and bakes its
    result into the graph), without importing Dynamo when fusedformer is imported — that import
    alone doubles the import time. tests/test_compile.py fails if a torch release stops honouring
    the marker."""
    fn._dynamo_marked_constant = True
    return fn


def profiler_cpu_allocations(prof) -> list[tuple[int, int, int]]:
    """The CPU allocator's events recorded by a finished ``torch.profiler.profile(profile_memory=True)``:
    ``(time_ns, bytes, ptr)`` in time order, ``bytes`` negative for a free.

    Written for torch 2.0 - 2.14 (``kineto_results.experimental_event_tree()``, the ``Allocation``
    member of ``torch._C._profiler._EventType``, ``alloc_size`` / ``ptr`` / ``device`` of its
    extra fields). There is no public per-allocation view: ``key_averages()`` sums per op (frees of
    memory allocated before the window cannot be told apart), and ``export_memory_timeline`` needs
    stacks and shapes recorded and is itself built on the private ``torch.profiler._memory_profiler``."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.ptr))
    events.sort(key=lambda e: e[0])
    return events


def raise_dynamo_recompile_limits(per_code: int, accumulated: int) -> None:
    """Let Dynamo recompile one function at least ``per_code`` times (``accumulated`` in all) before
    it falls back to eager. ``torch._dynamo.config`` is the only place these limits are set (torch's
    own troubleshooting docs point there), and their names changed across releases: the 2.x series
    started with ``cache_size_limit`` / ``accumulated_cache_size_limit`` and later renamed them
    ``recompile_limit`` / ``accumulated_recompile_limit`` (torch 2.14 answers to both). Each name is
    set where it exists, and never lowered."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), per_code))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), accumulated))


def disable_donated_buffers() -> None:
    """Turn off AOTAutograd's donated buffers (``torch._functorch.config.donated_buffer``:
    late 2.x releases, 2.14 included; a no-op where it does not exist): a compiled backward that donates its saved tensors refuses to run twice
    on one retained graph (``retain_graph=True``), which a benchmark replaying one backward needs.
    No public switch exists."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
