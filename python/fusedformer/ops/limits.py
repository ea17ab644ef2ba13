"""What each backend's kernels take, declared once per op and backend.

One :class:`Limits` per (op, backend): the device its tensors must be on, the dtypes its kernels
take, and bounds on named sizes (head dims, widths, sequence lengths). From these:

* the backend's ``reasons(inputs)`` in the op's table (``ops/_common.py``: ``native_reasons``,
  ``triton_reasons``) — what dispatch and ``fusedformer info`` report;
* the Triton launchers' own argument checks (``kernels/*.py`` call :meth:`Limits.check`);
* ``tests/test_limits.py``, which checks that ``fusedformer._C`` rejects exactly the inputs these
  reject: the cpu kernels by calling them, the cuda kernels' limits through the small
  ``fusedformer_C::*_cuda_limits`` checks (the same C++ functions the cuda entry points call).

Size keys are the keys of the ``inputs`` dict each op builds for dispatch (``ops/<op>.py``). This
module imports nothing but torch, so the Triton launchers can import it without the ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Size:
    """A bound on one named size: ``value <= max`` and ``value % multiple_of == 0``."""
    key: str                        # the key in the op's inputs dict ("head_dim")
    name: str                       # what messages call it ("head dim")
    max: Optional[int] = None
    multiple_of: int = 1
    max_why: str = ""               # why the bound, for the message
    multiple_why: str = ""          # why the multiple, for the message

    def reason(self, value: int) -> Optional[str]:
        if self.max is not None and value > self.max:
            return f"{self.name} {value} > {self.max}" + (f" ({self.max_why})" if self.max_why else "")
        if value % self.multiple_of:
            return (f"{self.name} {value} is not a multiple of {self.multiple_of}"
                    + (f" ({self.multiple_why})" if self.multiple_why else ""))
        return None


@dataclass(frozen=True)
class Limits:
    """One backend's limits for one op."""
    backend: str                                    # "cpu", "cuda", "triton"
    devices: tuple[str, ...]                        # device types its tensors may be on
    dtypes: tuple[torch.dtype, ...] = FAST_DTYPES
    dtype_why: str = ""                             # why only these dtypes, for the message
    sizes: tuple[Size, ...] = field(default_factory=tuple)

    def dtype_reason(self, dtype: Optional[torch.dtype]) -> Optional[str]:
        if dtype is None or dtype in self.dtypes:
            return None
        takes = " / ".join(str(d).replace("torch.", "") for d in self.dtypes)
        return f"dtype {dtype}: the {self.backend} kernels take {takes}" + (f" ({self.dtype_why})" if self.dtype_why else "")

    def input_reasons(self, inputs: Mapping) -> list[str]:
        """Why these inputs are outside the limits (dtype and sizes; not the device or the build)."""
        why = []
        dtype = self.dtype_reason(inputs.get("dtype"))
        if dtype:
            why.append(dtype)
        for size in self.sizes:
            if size.key in inputs:
                r = size.reason(int(inputs[size.key]))
                if r:
                    why.append(r)
        return why

    def check(self, op: str, dtype: Optional[torch.dtype] = None, **sizes: int) -> None:
        """Raise ``TypeError`` (dtype) / ``ValueError`` (sizes) naming ``op`` and every reason."""
        why = self.input_reasons({"dtype": dtype, **sizes})
        if not why:
            return
        exc = TypeError if self.dtype_reason(dtype) else ValueError
        raise exc(f"{op}: " + "; ".join(why))

    def size(self, key: str) -> Size:
        return next(s for s in self.sizes if s.key == key)


def _sizes(names: Sequence[tuple[str, str]], **bounds) -> tuple[Size, ...]:
    return tuple(Size(key, name, **bounds) for key, name in names)


_HEAD_DIMS = (("head_dim", "head dim"), ("head_dim_v", "value head dim"))
_SEQLENS = (("seqlen_q", "query length"), ("seqlen_k", "key length"))
_CPU = Limits("cpu", ("cpu",))
_TRITON_DEVICES = ("cuda", "cpu")   # cpu only under TRITON_INTERPRET=1 (backends.triton_device_reason)

# attention: csrc/attention/attention_problem.cpp (make_problem, check_cuda_problem), kernels/attention.py
ATTENTION: dict[str, Limits] = {
    "cpu": _CPU,
    "cuda": Limits("cuda", ("cuda",), HALF_DTYPES, "tensor cores",
                   _sizes(_HEAD_DIMS, max=256, multiple_of=8, multiple_why="16-byte copies")
                   + _sizes(_SEQLENS, max=65535 * 32, max_why="the cuda kernels' grid limit")),
    "triton": Limits("triton", _TRITON_DEVICES, FAST_DTYPES, "", _sizes(_HEAD_DIMS, max=256)),
}

# attention_varlen: the Triton attention kernels (no native implementation)
ATTENTION_VARLEN: dict[str, Limits] = {"triton": ATTENTION["triton"]}

# layer_norm / rms_norm: csrc/layer_norm/layer_norm_ops.cpp, kernels/layer_norm.py
LAYER_NORM: dict[str, Limits] = {
    "cpu": _CPU,
    "cuda": Limits("cuda", ("cuda",)),
    "triton": Limits("triton", _TRITON_DEVICES),
}

# gelu_ffn: csrc/gelu_ffn/gelu_ffn_ops.cpp (check_cuda_limits), kernels/gelu_ffn.py
_WIDTHS = (("C", "C (input width)"), ("F", "F (hidden width)"), ("C2", "C2 (output width)"))
GELU_FFN: dict[str, Limits] = {
    "cpu": _CPU,
    "cuda": Limits("cuda", ("cuda",), HALF_DTYPES, "tensor-core GEMMs",
                   _sizes(_WIDTHS, max=2**31 - 1, multiple_of=8, max_why="32-bit indexing",
                          multiple_why="16-byte row chunks")),
    "triton": Limits("triton", _TRITON_DEVICES),
}

BY_OP: dict[str, dict[str, Limits]] = {"attention": ATTENTION, "attention_varlen": ATTENTION_VARLEN,
                                       "layer_norm": LAYER_NORM, "gelu_ffn": GELU_FFN}
