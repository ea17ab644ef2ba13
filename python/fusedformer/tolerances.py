"""The project's one tolerance table for the 2x error rule (DESIGN.md, "Numerics and tests").

    max|out - ref64| <= 2 * max|base - ref64| + ATOL[op][dtype]

with ``ref64`` the reference in float64 and ``base`` the reference in the run's dtype; float32 must
also meet ``max|out - ref64| <= F32_ATOL + F32_RTOL[op] * max|ref64|``. Used by the tests
(tests/numerics.py) and by the benchmarks' check before timing (bench/common.py).
"""
import torch

# Absolute slack on top of twice the reference's own error, per op and dtype.
ATOL = {
    "layer_norm": {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3},
    "attention": {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3},
    "gelu_ffn": {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3},
}
# float32's tight bound: relative to the largest reference magnitude (matmul-heavy ops accumulate
# over long dot products, hence their looser factor).
F32_ATOL = 1e-5
F32_RTOL = {"layer_norm": 1e-5, "attention": 2e-5, "gelu_ffn": 5e-5}
