"""Dispatch and the cuda attention kernels' shared memory: the one GPU-dependent limit.

``_C.attention_cuda_smem_bytes`` (csrc/attention/attention_cuda_config.h) is compared with the
device's opt-in shared memory per block; where a kernel does not fit, the cuda backend gives a
reason and dispatch picks another backend. Without a GPU the device properties are stood in for."""
import types

import pytest
import torch

from fusedformer import backends
from fusedformer.ops import attention as attention_module

SM86_OPTIN = 99 * 1024    # sm_86 / sm_89
SM80_OPTIN = 163 * 1024
SM90_OPTIN = 227 * 1024


def _smem(d, dv, backward, deterministic):
    try:
        import fusedformer._C  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"fusedformer._C is not built: {exc}")
    return torch.ops.fusedformer_C.attention_cuda_smem_bytes(d, dv, backward, deterministic)


@pytest.mark.parametrize("d", [8, 40, 64, 96, 128, 200, 256])
def test_every_kernel_fits_sm80_and_sm90(d):
    for backward in (False, True):
        for det in (False, True):
            need = _smem(d, d, backward, det)
            assert 0 < need <= SM80_OPTIN <= SM90_OPTIN, (d, backward, det, need)


def test_what_does_not_fit_99_kib():
    """docs/cuda_kernels.md, Shared memory: on sm_86 / sm_89 the head-dim-256 backward and the
    deterministic backward at 128 / 256 need more than 99 KiB; every forward fits."""
    over = {(d, backward, det) for d in (64, 128, 256) for backward in (False, True) for det in (False, True)
            if _smem(d, d, backward, det) > SM86_OPTIN}
    assert over == {(256, True, False), (256, True, True), (128, True, True)}, over
    assert _smem(40, 200, True, False) == _smem(256, 256, True, False)  # the bucket of max(D, Dv)
    assert _smem(64, 64, True, True) >= _smem(64, 64, True, False)      # + the dQ kernel


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes in a GPU with ``props.optin`` bytes of opt-in shared memory per block."""
    props = types.SimpleNamespace(shared_memory_per_block_optin=SM86_OPTIN)
    # backends caches availability per process: give the fake GPU its own cache, restored after
    monkeypatch.setattr(backends, "_status_cache", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    attention_module._shared_memory_reasons.cache_clear()  # cached per process, keyed by the device index
    yield props
    attention_module._shared_memory_reasons.cache_clear()


def _inputs(d, needs_grad):
    return {"device": torch.device("cuda", 0), "dtype": torch.bfloat16, "head_dim": d, "head_dim_v": d,
            "needs_grad": needs_grad}


def test_cuda_reasons_follow_the_device_limit(fake_gpu, monkeypatch):
    _smem(64, 64, False, False)  # skips without _C
    reasons = attention_module.cuda_shared_memory_reasons
    assert reasons(_inputs(256, needs_grad=False)) == []           # the forward fits 99 KiB
    why = reasons(_inputs(256, needs_grad=True))
    assert len(why) == 1 and "backward" in why[0] and str(SM86_OPTIN) in why[0] and "(256, 256)" in why[0]
    assert reasons(_inputs(128, needs_grad=True)) == []
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "deterministic backward" in " ".join(reasons(_inputs(128, needs_grad=True)))
    fake_gpu.shared_memory_per_block_optin = SM90_OPTIN
    attention_module._shared_memory_reasons.cache_clear()  # another device
    assert reasons(_inputs(256, needs_grad=True)) == []
    assert reasons({**_inputs(256, needs_grad=True), "device": torch.device("cpu")}) == []


def test_the_reason_is_in_the_cuda_table(fake_gpu):
    """The cuda backend's reasons() include it once the declared limits pass."""
    _smem(64, 64, False, False)
    impl = attention_module.TABLE["cuda"]
    inputs = {**_inputs(256, needs_grad=True), "seqlen_q": 128, "seqlen_k": 128, "has_attn_mask": False,
              "has_key_padding_mask": False, "dropout_p": 0.0}
    declared = attention_module._declared_cuda_reasons(inputs)
    if declared:  # e.g. a CPU-only build: those reasons come first, the shared memory is not asked
        assert impl.reasons(inputs) == declared
        pytest.skip("the cuda backend's declared reasons apply first here: " + "; ".join(declared))
    assert any("shared memory" in w for w in impl.reasons(inputs)), impl.reasons(inputs)

