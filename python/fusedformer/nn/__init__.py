"""Drop-in ``nn.Module``s on the fused ops.

=================================  ===========================================  =======================
module                             replaces                                     fused op(s)
=================================  ===========================================  =======================
:class:`LayerNorm`                 ``torch.nn.LayerNorm``                       ``layer_norm``
:class:`RMSNorm`                   ``torch.nn.RMSNorm``                         ``rms_norm``
:class:`MultiheadAttention`        ``torch.nn.MultiheadAttention``              ``attention``
:class:`GeluFFN`                   ``Linear -> GELU -> Linear -> Dropout``      ``gelu_ffn``
:class:`TransformerEncoderLayer`   ``torch.nn.TransformerEncoderLayer``         all three
:class:`TransformerDecoderLayer`   ``torch.nn.TransformerDecoderLayer``         all three
=================================  ===========================================  =======================

Each subclasses the torch module it replaces (same constructor arguments, parameter names and
``state_dict`` keys) and adds a ``backend=`` keyword: a backend name, or ``None`` to follow
``fusedformer.use_backend`` / ``FUSEDFORMER_BACKEND`` / automatic selection at call time.
``fusedformer.convert(model)`` turns the torch modules of an existing model into these, in place.
"""
from .attention import MultiheadAttention
from .decoder import TransformerDecoderLayer
from .feedforward import GeluFFN
from .normalization import LayerNorm, RMSNorm
from .transformer import TransformerEncoderLayer

__all__ = ["GeluFFN", "LayerNorm", "MultiheadAttention", "RMSNorm", "TransformerDecoderLayer",
           "TransformerEncoderLayer"]
