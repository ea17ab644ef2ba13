"""The fused ops: custom ops, autograd and the functional API, one module per op."""
from .attention import attention
from .gelu_ffn import gelu_ffn
from .layer_norm import layer_norm, rms_norm

__all__ = ["attention", "gelu_ffn", "layer_norm", "rms_norm"]
