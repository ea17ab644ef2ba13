"""The fused ops, one module per op: custom ops, autograd, backend table and functional API.

The functions are exported from the top-level package (``fusedformer.layer_norm`` ...); here the
names refer to the modules (``fusedformer.ops.layer_norm.TABLE`` ...).
"""
