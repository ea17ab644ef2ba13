"""Argument checks and backend-reason helpers shared by the ops.

Bad input gets a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device,
value) that names the argument and says what was expected — before any kernel sees it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _compat, backends, rng
from . import limits
from ..errors import InputError, InputTypeError

SeedLike = Union[int, Tensor, None]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def check_tensor(op: str, name: str, t, *, ndim: Optional[int] = None, min_ndim: int = 0,
                 nonempty: bool = False) -> Tensor:
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point()):
        raise InputTypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise InputError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise InputError(f"{op}: {name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise InputError(f"{op}: {name} is empty (shape {tuple(t.shape)}); expected at least one element")
    return t


def check_like(op: str, name: str, t: Optional[Tensor], ref: Tensor, ref_name: str, *,
               shape: Optional[Sequence[int]] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
               ) -> Optional[Tensor]:
    """Check an optional tensor argument against the main input: type, device, dtype, shape."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != ref.device:
        raise InputError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "expected the same device")
    allowed = tuple(dtypes) if dtypes is not None else (ref.dtype,)
    if t.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise InputTypeError(f"{op}: {name} has dtype {t.dtype}; expected {want} (the dtype of {ref_name})")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise InputError(f"{op}: {name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return t


def check_probability(op: str, name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise InputTypeError(f"{op}: {name} must be a float, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise InputError(f"{op}: {name} must be in [0, 1), got {p}")
    return p


def check_finite(op: str, name: str, value, *, min_value: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{op}: {name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise InputError(f"{op}: {name} must be >= {min_value}, got {value}")
    return value


def check_offset(op: str, offset) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InputTypeError(f"{op}: offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise InputError(f"{op}: offset must be >= 0, got {offset}")
    return offset


def make_seed(op: str, seed: SeedLike, dropout_p: float) -> Optional[Tensor]:
    """The op-level seed: None without dropout, else a (1,) int64 CPU tensor.

    ``None`` with dropout draws a fresh seed from torch's default CPU generator."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return rng.new_seed()
    if isinstance(seed, bool):
        raise InputTypeError(f"{op}: seed must be an int or an integer tensor, got bool")
    if isinstance(seed, int):
        return torch.tensor([seed & ((1 << 63) - 1)], dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise InputTypeError(f"{op}: seed tensor must hold one integer, got dtype {seed.dtype} "
                            f"and shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device="cpu", dtype=torch.int64)
    raise InputTypeError(f"{op}: seed must be an int, an integer tensor or None, got {type(seed).__name__}")


# ------------------------------------------------------------------------------------------------
# backend reasons, generated from the declared limits (ops/limits.py)
# ------------------------------------------------------------------------------------------------
def reference_reasons(inputs: dict) -> list[str]:
    return []


def native_reasons(op: str, lim: limits.Limits) -> Callable[[dict], list[str]]:
    """Reasons for the ``cpu`` / ``cuda`` backends: built?, right device?, then ``lim``."""
    (device_type,) = lim.devices

    def reasons(inputs: dict) -> list[str]:
        why = []
        missing = backends.native_reason(device_type, op)
        if missing:
            why.append(missing)
        device = inputs["device"]
        if device.type != device_type:
            why.append(f"tensors are on {device.type}; the {lim.backend} backend takes {device_type} tensors")
        if not inputs.get("probe"):
            why += lim.input_reasons(inputs)
        return why

    return reasons


def triton_reasons(op: str, lim: limits.Limits) -> Callable[[dict], list[str]]:
    """Reasons for the ``triton`` backend: installed?, a device it can run on?, then ``lim``."""
    def reasons(inputs: dict) -> list[str]:
        missing = backends.triton_device_reason(inputs["device"])
        why = [missing] if missing else []
        if not inputs.get("probe"):
            why += lim.input_reasons(inputs)
        return why

    return reasons


def backend_table(op: str, reference_fns: Callable, load_native: Optional[Callable],
                  load_triton: Callable, triton_module: str) -> dict:
    """An op's backend table: the reference, the native ``cpu`` / ``cuda`` backends (when the op
    has them) and ``triton`` (when its kernels module is installed), each backend's reasons
    generated from ``limits.BY_OP[op]``; registered with ``backends`` for ``why_unavailable``."""
    lim = limits.BY_OP[op]
    table = {"reference": backends.Impl(reference_fns, reference_reasons)}
    if load_native is not None:
        table["cpu"] = backends.Impl(load_native, native_reasons(op, lim["cpu"]))
        table["cuda"] = backends.Impl(load_native, native_reasons(op, lim["cuda"]))
    if triton_kernels_installed(triton_module):
        table["triton"] = backends.Impl(load_triton, triton_reasons(op, lim["triton"]))
    return backends.register(op, table)


def triton_kernels_installed(module: str) -> bool:
    """Whether ``fusedformer.kernels.<module>`` exists (without importing it, hence Triton)."""
    import importlib.util
    return importlib.util.find_spec(f"fusedformer.kernels.{module}") is not None


def any_empty(*tensors: Optional[Tensor]) -> bool:
    """Whether a call has no work (a zero-size input): such calls run on the reference, which gives
    torch's empty (or zero-sum) results and gradients. Size-oblivious, so that a symbolic size
    under torch.export (an unbacked batch size, say) is taken as non-empty instead of guarded on."""
    return any(t is not None and _compat.known_zero(t.numel()) for t in tensors)


def fns(table: dict, backend: str, *tensors: Optional[Tensor]) -> tuple[Callable, Callable]:
    """The (forward, backward) functions of ``backend`` — the reference's when the call is empty."""
    return table["reference" if any_empty(*tensors) else backend].fns()


def native_op(name: str):
    """``torch.ops.fusedformer_C.<name>`` (only called once ``native_reason`` said it exists)."""
    return getattr(torch.ops.fusedformer_C, name)


# ------------------------------------------------------------------------------------------------
# the two call paths of a fused op
# ------------------------------------------------------------------------------------------------
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _traced(args) -> bool:
    """Whether a call must go through the custom ops: under torch.compile / export tracing, a
    dispatch mode (fake tensors, make_fx, FlopCounterMode, ...), a torch.func transform, or with a
    tensor subclass among the arguments."""
    if torch.compiler.is_compiling() or _compat.in_dispatch_mode_or_transform():
        return True
    return any(isinstance(a, Tensor) and type(a) not in _PLAIN_TENSOR_TYPES for a in args)


class FusedOp:
    """One fused op's forward/backward custom-op pair, and the path each call takes.

    The ``torch.library`` custom ops are what ``torch.compile``, ``torch.export`` and fake tensors
    see. In plain eager mode, though, their Python dispatch costs about 0.07 ms per forward and 0.35
    ms per forward+backward over a direct call (measured on the 2-core CI machine for a tiny
    layer_norm: 86 vs 16 us forward, 500 vs 140 us forward+backward), a large share of a CPU kernel
    that takes a millisecond or two. So an eager call on plain tensors goes through a
    ``torch.autograd.Function`` built from the same ``setup_context`` and ``backward`` and calls
    the backend's functions directly; a traced call goes through the custom ops. Both run the same
    backend code on the same arguments, and the tests run both paths.

    ``args`` of :meth:`__call__` and :meth:`backward` are the custom ops' arguments (the backend's
    name last); the op's ``backward`` calls ``self.backward(ctx, *args)``.
    """

    def __init__(self, name: str, table: dict, fwd_op, bwd_op, setup_context, backward):
        self.table, self.fwd_op, self.bwd_op = table, fwd_op, bwd_op
        fwd_op.register_autograd(backward, setup_context=setup_context)

        # forward(ctx, ...) rather than a separate setup_context: with one, every apply() binds
        # the arguments through inspect.signature (~40 us). torch.func transforms, which need the
        # separate form, take the custom-op path anyway.
        def forward(ctx, *args):
            output = table[args[-1]].fns()[0](*args[:-1])
            setup_context(ctx, args, output)
            ctx.eager = True
            return output

        # Built with type() so that the autograd node is named after the op (<layer_norm_eagerBackward>).
        self._eager = type(f"{name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))})

    def __call__(self, *args):
        return self.fwd_op(*args) if _traced(args) else self._eager.apply(*args)

    def backward(self, ctx, *args):
        if getattr(ctx, "eager", False):
            return self.table[args[-1]].fns()[1](*args[:-1])
        return self.bwd_op(*args)
