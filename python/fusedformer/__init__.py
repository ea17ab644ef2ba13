"""fusedformer: fused Transformer kernels for PyTorch.

    import fusedformer as ff
    y = ff.layer_norm(x, (C,), w, b, residual=r, dropout_p=0.1)
    o = ff.attention(q, k, v, key_padding_mask=pad, dropout_p=0.1, is_causal=False)
    z = ff.gelu_ffn(x, w1, b1, w2, b2, approximate="none")
    with ff.use_backend("reference"): ...
    ff.info()
    report = ff.convert(model)          # fused drop-ins for torch.nn / Hugging Face BERT, GPT-2 layers
    layer = ff.nn.TransformerEncoderLayer(512, 8, batch_first=True)
"""
from . import nn, reference, rng
from .backends import BACKENDS, BackendError, use_backend
from .info import info
from .integrations import convert, revert
from .ops.attention import attention
from .ops.attention_varlen import attention_varlen
from .ops.gelu_ffn import gelu_ffn
from .ops.layer_norm import layer_norm, rms_norm

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "attention", "attention_varlen", "convert", "gelu_ffn", "info", "layer_norm",
           "nn", "reference", "revert", "rms_norm", "rng", "use_backend", "__version__"]
