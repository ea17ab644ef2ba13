"""One contract per op, written once: the C++ ops (``torch.ops.fusedformer_C.<op>_fwd/_bwd``) take
exactly the arguments of the custom ops the public functions call (``torch.ops.fusedformer.*``,
less the trailing ``backend`` they dispatch on) — same names, same order, same types, the dropout
seed as the op-level tensor — so ``ops/<op>.py`` hands them over unchanged."""
import pytest
import torch

import fusedformer  # noqa: F401  (registers the custom ops)
from fusedformer import backends

OPS = ["attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "gelu_ffn_fwd", "gelu_ffn_bwd"]


def _arguments(schema):
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("name", OPS)
def test_native_and_custom_op_signatures_agree(name):
    why = backends.why_unavailable(name.rsplit("_", 1)[0], "cpu")
    if why:
        pytest.skip("fusedformer._C: " + "; ".join(why))
    import fusedformer.ops  # noqa: F401
    custom = _arguments(getattr(torch.ops.fusedformer, name).default._schema)
    native = _arguments(getattr(torch.ops.fusedformer_C, name).default._schema)
    assert custom[-1] == ("backend", "str"), custom
    assert native == custom[:-1], f"{name}: fusedformer_C {native} != fusedformer {custom[:-1]}"
    assert ("seed", "Optional[Tensor]") in native


@pytest.mark.parametrize("seed", [torch.tensor([7], dtype=torch.int64), torch.tensor(7, dtype=torch.int32)])
def test_the_native_op_reads_the_seed_tensor(seed):
    """The same mask from the seed tensor as from the reference with that seed."""
    if backends.why_unavailable("layer_norm", "cpu"):
        pytest.skip("fusedformer._C (cpu) is not built")
    x = torch.randn(8, 32)
    h = torch.ops.fusedformer_C.layer_norm_fwd(x, torch.zeros_like(x), None, None, 1e-5, 0.5, seed, 0, False)[1]
    h_ref = fusedformer.reference.layer_norm_fwd(x, torch.zeros_like(x), None, None, 1e-5, 0.5,
                                                 seed.reshape(1).to(torch.int64), 0, False)[1]
    assert torch.equal(h, h_ref)  # h = residual + dropout(x): the masks agree
    assert not torch.equal(h, x)
    with pytest.raises((RuntimeError, ValueError), match="seed must be a tensor holding one integer"):
        torch.ops.fusedformer_C.layer_norm_fwd(x, None, None, None, 1e-5, 0.5, torch.tensor([1.5]), 0, False)
