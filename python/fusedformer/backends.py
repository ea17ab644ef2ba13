"""Backend registry and selection.

Four backends implement every op behind one API:

==============  ==============================================  ==========================
backend         what it is                                      where it runs
==============  ==============================================  ==========================
``reference``   plain PyTorch (``fusedformer.reference``)       anywhere
``triton``      Triton kernels (``fusedformer.kernels``)        CUDA GPUs; CPU only with
                                                                ``TRITON_INTERPRET=1``
``cuda``        CUDA C++ kernels in ``fusedformer._C``          CUDA GPUs
``cpu``         C++ kernels in ``fusedformer._C``               CPU
==============  ==============================================  ==========================

Selection happens per call, in this order:

1. the ``backend=`` argument of the op or module;
2. the innermost ``with fusedformer.use_backend(name):`` block;
3. the ``FUSEDFORMER_BACKEND`` environment variable (read at each call);
4. automatic: ``cuda`` → ``triton`` → ``reference`` for CUDA tensors, ``cpu`` → ``reference`` for
   CPU tensors. ``auto`` in 1–3 means the same.

Every backend answers ``reasons(inputs) -> list[str]``: why it cannot take these inputs (empty if it
can) — including "not built" or "not installed". When nothing fits, the error lists every backend
with its reasons (the idea of xformers' dispatch). The input limits behind those reasons (dtypes,
head dims, widths) are declared once per op and backend in ``fusedformer.ops.limits``.

Whether a backend can run an op here at all — built, installed, a device it runs on — is one
question with one answer: :func:`why_unavailable` (``[]`` when it can) / :func:`is_available`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from . import _compat
from .errors import InputError, InputTypeError

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "FUSEDFORMER_BACKEND"

_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fusedformer_backend", default=None)


class BackendError(RuntimeError):
    """No backend (or not the requested one) can take the given inputs."""


def check_name(name, source: str) -> str:
    """The one rule for a backend name, wherever it comes from (``backend=`` of an op or a module,
    ``use_backend``, ``FUSEDFORMER_BACKEND``): a string, case and surrounding spaces ignored,
    ``'auto'`` or one of ``BACKENDS``. Returns the canonical (lower-case) name."""
    if not isinstance(name, str):
        raise InputTypeError(f"{source}: backend must be a string, got {type(name).__name__}")
    canonical = name.strip().lower()
    if canonical != "auto" and canonical not in BACKENDS:
        raise InputError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS} "
                         "(case is ignored)")
    return canonical


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fusedformer calls on backend ``name`` (or ``'auto'``), unless a call says
    otherwise with its own ``backend=`` argument. Nests; thread- and task-local."""
    token = _current.set(check_name(name, "use_backend"))
    try:
        yield
    finally:
        _current.reset(token)


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by argument, context or environment (``'auto'`` when none)."""
    if backend is not None:
        return check_name(backend, "backend=")
    ctx = _current.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(ENV_VAR)
    if env:
        return check_name(env, ENV_VAR)
    return "auto"


# ------------------------------------------------------------------------------------------------
# What is installed and built. Each returns None when available, else the reason it is not.
# Results are cached: they do not change within a process. Under torch.compile these probes are
# compile-time constants (`assume_constant_result`): Dynamo runs them once, eagerly, with their
# string arguments, instead of tracing imports and file reads.
# ------------------------------------------------------------------------------------------------
_status_cache: dict[str, Optional[str]] = {}


#: Marks a probe a compile-time constant (``_compat.mark_dynamo_constant``: what
#: ``assume_constant_result`` does, without importing Dynamo at ``import fusedformer``).
_constant = _compat.mark_dynamo_constant


def build_record() -> dict:
    """What ``setup.py`` compiled, and why it left anything out (``_build_info.json``)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


@_constant
def _native_library_reason() -> Optional[str]:
    if "native" not in _status_cache:
        reason = None
        try:
            importlib.import_module("fusedformer._C")
        except ImportError as exc:
            record = build_record()
            why = record.get("cpu_reason") or "it was not built"
            reason = f"fusedformer._C is not available ({why}; import said: {exc})"
        _status_cache["native"] = reason
    return _status_cache["native"]


@_constant
def native_reason(device_type: str, op: str) -> Optional[str]:
    """Why ``fusedformer._C`` cannot run ``op`` on ``device_type`` ('cpu' or 'cuda'), or None."""
    key = f"native:{device_type}:{op}"
    if key not in _status_cache:
        reason = _native_library_reason()
        if reason is None:
            dispatch_key = "CPU" if device_type == "cpu" else "CUDA"
            has = hasattr(torch.ops.fusedformer_C, f"{op}_fwd") and \
                _compat.has_kernel(f"fusedformer_C::{op}_fwd", dispatch_key)
            if not has:
                record = build_record()
                if device_type == "cuda" and not record.get("cuda", False):
                    reason = f"CUDA kernels were not compiled ({record.get('cuda_reason') or 'unknown reason'})"
                else:
                    reason = f"fusedformer._C has no {dispatch_key} kernel for {op}"
        if reason is None and device_type == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA GPU is visible to torch"
        _status_cache[key] = reason
    return _status_cache[key]


@_constant
def triton_reason() -> Optional[str]:
    """Why Triton kernels cannot run at all in this process, or None."""
    if "triton" not in _status_cache:
        reason = None
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            reason = f"triton is not installed ({exc})"
        _status_cache["triton"] = reason
    return _status_cache["triton"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reason(device: torch.device) -> Optional[str]:
    reason = triton_reason()
    if reason is not None:
        return reason
    if device.type == "cpu" and not triton_interpreting():
        return "tensors are on the CPU (Triton runs there only under TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"tensors are on {device.type}; Triton kernels take CUDA tensors"
    return None


# ------------------------------------------------------------------------------------------------
# Per-op backend tables
# ------------------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One backend's implementation of one op.

    ``load`` returns ``(fwd, bwd)`` (imported lazily, on first use); ``reasons(inputs)`` lists why
    the backend cannot take ``inputs`` (a dict of the op's named arguments)."""
    load: Callable[[], tuple[Callable, Callable]]
    reasons: Callable[[dict], list[str]]
    _fns: Optional[tuple[Callable, Callable]] = None

    def fns(self) -> tuple[Callable, Callable]:
        if self._fns is None:
            self._fns = self.load()
        return self._fns


def resolve(op: str, table: dict[str, Impl], backend: Optional[str], inputs: dict,
            device: torch.device) -> str:
    """Pick the backend for one call of ``op`` (see the module docstring for the order)."""
    name = requested_backend(backend)

    def reasons_of(n: str) -> list[str]:
        if n not in table:
            return [f"{op} has no {n} implementation yet"]
        return table[n].reasons(inputs)

    if name != "auto":
        why = reasons_of(name)
        if why:
            raise BackendError(_explain(op, f"the requested backend {name!r} cannot take these inputs",
                                        {n: reasons_of(n) for n in BACKENDS}))
        return name
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    collected = {}
    for n in order:
        why = reasons_of(n)
        if not why:
            return n
        collected[n] = why
    for n in BACKENDS:
        if n not in collected:
            collected[n] = reasons_of(n) or [f"not chosen automatically for {device.type} tensors"]
    raise BackendError(_explain(op, "no backend can take these inputs", collected))


def _explain(op: str, headline: str, reasons: dict[str, list[str]]) -> str:
    lines = [f"fusedformer.{op}: {headline}:"]
    for n in BACKENDS:
        why = reasons.get(n, [])
        lines.append(f"  {n}: " + ("; ".join(why) if why else "can take them"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Availability: can a backend run an op here (not input-specific)?
# ------------------------------------------------------------------------------------------------
_TABLES: dict[str, dict[str, Impl]] = {}


def register(op: str, table: dict[str, Impl]) -> dict[str, Impl]:
    """Record ``op``'s backend table (``ops/<op>.py`` does, at import) for :func:`why_unavailable`."""
    _TABLES[op] = table
    return table


def why_unavailable(op, backend: str, device="cpu") -> list[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` tensors in this process — not built, not
    installed, no GPU, a device it does not take, no such implementation — or ``[]`` when it can.

    ``op``: the op's name (``"attention"``) or its module (``fusedformer.ops.attention``).
    The one availability probe: ``info()``, the tests, the benchmarks and the training driver ask
    this. Whether particular inputs fit is the op's business (its limits, ``ops/limits.py``)."""
    name = getattr(op, "OP", op)
    if name not in _TABLES and isinstance(name, str) and name.isidentifier():
        try:  # a table registers when its op module is imported
            importlib.import_module(f"fusedformer.ops.{name}")
        except ImportError:
            pass
    if name not in _TABLES:
        raise InputError(f"why_unavailable: unknown op {name!r}; expected one of {tuple(sorted(_TABLES))}")
    backend = check_name(backend, "why_unavailable")
    if backend == "auto":
        raise InputError("why_unavailable: backend must name a backend, not 'auto'")
    table = _TABLES[name]
    if backend not in table:
        return [f"{name} has no {backend} implementation yet"]
    return table[backend].reasons({"device": torch.device(device), "probe": True})


def is_available(op, backend: str, device="cpu") -> bool:
    """Whether ``backend`` can run ``op`` on ``device`` tensors here (``not why_unavailable(...)``)."""
    return not why_unavailable(op, backend, device)


def availability(op: str, device) -> dict[str, list[str]]:
    """For ``info()``: each backend's standing reasons for ``op`` on ``device``."""
    return {n: why_unavailable(op, n, device) for n in BACKENDS}
