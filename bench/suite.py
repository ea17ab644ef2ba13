"""What is benchmarked: cases, providers, an op's description (``OpBench``), and the row statuses
of providers that cannot run (a reason) or fail the check. Nothing here runs at import time."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FUSEDFORMER_BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclass
class Case:
    """One benchmarked configuration of one op."""
    op: str
    sweep: str                 # the sweep it belongs to (one plot per sweep)
    params: dict               # shapes and flags, read by the op module
    label: str                 # short text for the table
    x: object                  # the plot's x value (a number, or a name for a categorical sweep)
    series: str = ""           # the plot panel it goes to within its sweep (say "D=64 causal")
    xname: str = ""            # what x is, for the plot's axis

    def config(self) -> str:
        return " ".join(f"{k}={_fmt_param(v)}" for k, v in self.params.items())


def _fmt_param(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


@dataclass
class Provider:
    """Something that computes an op: a fusedformer backend or what a user would use instead.

    ``fn(tensors, params)`` runs the op on the case's tensors (a dict) and returns the output (a
    tensor or a tuple). ``unavailable(device, dtype, params)`` says why it cannot run here, or None.
    ``own_rng``: its dropout draws from torch's RNG, so it can only be checked with dropout off."""
    name: str
    fn: Callable[[dict, dict], object]
    unavailable: Callable[[torch.device, torch.dtype, dict], Optional[str]] = lambda d, t, p: None
    own_rng: bool = False


CHECK_FAILED = "check failed: "
FAILED_BASELINE = "FAILED (timed only as the baseline): "


class Unavailable(RuntimeError):
    """Raised by a provider's ``fn`` when it turns down these particular inputs (with the reason)."""


def fusedformer_reason(op_module, backend: str, device: torch.device) -> Optional[str]:
    """Why a fusedformer backend cannot run ``op_module``'s op on ``device`` at all (not input-specific)."""
    from fusedformer.backends import why_unavailable
    why = why_unavailable(op_module, backend, device)
    return "; ".join(why) if why else None


def fusedformer_providers(op_module, make_fn: Callable[[str], Callable[[dict, dict], object]]) -> list["Provider"]:
    """A provider per fusedformer backend: ``make_fn(backend)`` runs the op on it; unavailable
    where :func:`fusedformer_reason` gives a reason."""
    return [Provider(b, make_fn(b), functools.partial(lambda d, t, p, b: fusedformer_reason(op_module, b, d), b=b))
            for b in FUSEDFORMER_BACKENDS]


def backend_error_reason(exc: Exception, backend: str) -> str:
    """The line about ``backend`` in a ``BackendError`` message (the whole message if none)."""
    for line in str(exc).splitlines():
        if line.strip().startswith(f"{backend}:"):
            return line.strip()[len(backend) + 1:].strip()
    return str(exc).strip().splitlines()[0]


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, created on first use. The suite compiles one function at many shapes,
    dtypes and flags: the recompile limit is raised so that dynamo never falls back to eager
    silently (which would time eager code under the name ``compile``). Donated buffers are turned
    off (see below), which can cost compile's backward a little memory."""
    state: dict = {}

    def run(*args):
        if "fn" not in state:
            from fusedformer import _compat

            _compat.raise_dynamo_recompile_limits(per_code=256, accumulated=4096)
            # The bwd mode replays the backward of one retained graph (retain_graph=True), which a
            # compiled backward with donated buffers refuses; give up that memory reuse instead.
            _compat.disable_donated_buffers()
            state["fn"] = torch.compile(fn)
        return state["fn"](*args)

    return run


def select_providers(providers: Sequence[Provider], wanted: Optional[Sequence[str]]) -> list[Provider]:
    """Keep the providers ``wanted`` names (exactly, or as a prefix before '-': 'sdpa' keeps 'sdpa-math')."""
    if wanted is None:
        return list(providers)
    return [p for p in providers if any(p.name == w or p.name.startswith(w + "-") for w in wanted)]


def default_dtypes(op: str, device_type: str) -> list[torch.dtype]:
    """What runs when no --dtype is given: float32 on a CPU (bfloat16 too for layer_norm, whose
    CPU kernel is held to F.layer_norm in both); bfloat16 on a GPU (float32 too for layer_norm)."""
    if device_type == "cpu":
        return [torch.float32, torch.bfloat16] if op == "layer_norm" else [torch.float32]
    return [torch.bfloat16, torch.float32] if op == "layer_norm" else [torch.bfloat16]


@dataclass
class OpBench:
    """What a bench_<op>.py module hands the driver."""
    op: str
    unit: str                                        # "TFLOP/s" or "GB/s"
    cases: Callable[[str, torch.device], list[Case]]  # (size, device) -> cases
    providers: Callable[[torch.device], list[Provider]]
    make_inputs: Callable[[dict, torch.dtype, torch.device], tuple[dict, list[str]]]
    work: Callable[[dict, str, torch.dtype], float]   # FLOPs or bytes of one call of a mode
    check_params: Callable[[dict], dict] = lambda p: p
    modes: Sequence[str] = MODES


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:160]


def status_of(exc: BaseException, provider: str) -> str:
    """The row status for a provider that raised ``exc``."""
    from fusedformer.backends import BackendError

    if isinstance(exc, BackendError):
        return f"unavailable: {backend_error_reason(exc, provider)}"
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    return f"error: {_short_error(exc)}"
