"""Shared fixtures: the backend parametrization (unavailable backends skip with their reason) and
the ``gpu`` mark. Triton kernels run on the CPU under its interpreter when no GPU is present."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created (fusedformer imports kernels lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedformer  # noqa: E402
from fusedformer import backends  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def device_for(backend: str) -> torch.device:
    """Where a backend's tests put their tensors."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton":
        return torch.device("cuda" if HAS_GPU else "cpu")
    if backend == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if HAS_GPU else "cpu")


def skip_unless_available(op_module, backend: str) -> torch.device:
    """Skip (with the backend's own reason) unless ``backend`` can run ``op_module``'s op here."""
    device = device_for(backend)
    if backend in ("cuda",) and not HAS_GPU:
        pytest.skip(f"{backend}: needs a CUDA GPU; none is visible to torch")
    why = backends.why_unavailable(op_module, backend, device)
    if why:
        pytest.skip(f"{backend}: " + "; ".join(why))
    return device


def dtype_for(backend: str) -> torch.dtype:
    """The dtype of a test that runs one dtype: the cuda attention / gelu_ffn kernels take 16-bit
    inputs only (tensor cores), every other backend float32."""
    return torch.bfloat16 if backend == "cuda" else torch.float32


def args_with(good: dict, **changes) -> tuple[dict, dict]:
    """A bad-input case: the positional arguments ``good`` with some replaced (a value, or a function
    of the good value), and every change naming no argument passed as a keyword argument."""
    args, kwargs = dict(good), {}
    for name, value in changes.items():
        if name in args:
            args[name] = value(args[name]) if callable(value) else value
        else:
            kwargs[name] = value
    return args, kwargs


@pytest.fixture(params=list(backends.BACKENDS))
def backend(request):
    return request.param


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    """The backends with GPU kernels: the op tests' ``gpu``-marked sweeps run on each."""
    return request.param


@pytest.fixture
def tma_descriptors(monkeypatch) -> list:
    """The Triton attention forward's K/V tensor descriptors (the Hopper TMA path, opt-in) made while
    the test runs, with the path switched on: a test asserts the list is not empty and holds no
    None (the path was taken, not refused)."""
    from fusedformer.kernels import attention as kernels
    made, real = [], kernels._tma_descriptor

    def spy(t, block):
        made.append(real(t, block))
        return made[-1]
    monkeypatch.setenv("FUSEDFORMER_TRITON_TMA", "1")
    monkeypatch.setattr(kernels, "_tma_descriptor", spy)
    return made
