"""torch.compile(fullgraph=True) traces through every fusedformer op — forward and backward,
with dropout seeds drawn inside the graph — and matches eager execution bit for bit."""
import pytest
import torch
import torch._inductor.config as inductor_config

import fusedformer as ff

C = 32


def block(x, w, b, q, k, v, w1, b1, w2, b2, kpm):
    y = ff.layer_norm(x, (C,), w, b, residual=x, dropout_p=0.1)
    o = ff.attention(q, k, v, is_causal=True, dropout_p=0.1, key_padding_mask=kpm)
    z = ff.gelu_ffn(y, w1, b1, w2, b2, approximate="tanh", dropout_p=0.1)
    r = ff.rms_norm(z, (C,), w)
    return (y * 1.5).sum() + (o * o).sum() + r.sum()


def _args(gen):
    shapes = [(4, 7, C), (C,), (C,), (2, 3, 9, 8), (2, 3, 9, 8), (2, 3, 9, 8), (48, C), (48,), (C, 48), (C,)]
    args = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    return args + [kpm]


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(compile_backend):
    # Inductor draws random numbers (here: the dropout seeds) with its own generator unless told to
    # fall back to eager's; with the fallback the seeds, hence the masks, are the same as in eager.
    # torch's own config.patch, not pytest's monkeypatch: since pytest 9.2 monkeypatch's undo
    # deletes an attribute it did not find in the target's __dict__, and deleting an entry of a
    # torch config module hides it for the rest of the process (every later read of
    # torch._inductor.config.fallback_random raises AttributeError).
    before = inductor_config.fallback_random
    with inductor_config.patch(fallback_random=True):
        _compiled_matches_eager(compile_backend)
    assert inductor_config.fallback_random == before, "the config patch must be undone"


def _compiled_matches_eager(compile_backend):
    torch._dynamo.reset()
    args = _args(torch.Generator().manual_seed(0))
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)

    def run(fn):
        for a in args[:-1]:
            a.grad = None
        torch.manual_seed(123)  # the dropout seeds are drawn from the default generator
        out = fn(*args)
        out.backward()
        return out.detach(), [a.grad.clone() for a in args[:-1]]

    out_c, grads_c = run(compiled)
    out_e, grads_e = run(block)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-4)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-4)


def test_no_graph_breaks_and_use_backend_is_guarded():
    torch._dynamo.reset()
    args = _args(torch.Generator().manual_seed(1))
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    auto = compiled(*args)
    with ff.use_backend("reference"):
        torch.manual_seed(5)
        ref = compiled(*args)
        torch.manual_seed(5)
        ref_eager = block(*args)
    torch.testing.assert_close(ref, ref_eager, rtol=0, atol=0)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-3)
