"""Triton kernels (imported lazily by fusedformer.ops; importing this package does no work)."""
