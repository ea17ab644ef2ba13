"""The error classes fusedformer raises for bad input.

Each names the argument and what was expected. They subclass both the Python exception a reader
expects (``ValueError`` for a wrong shape, value or device; ``TypeError`` for a wrong kind or dtype)
and ``RuntimeError``, which is what torch raises for the same mistakes — so code written against
``torch.nn.functional`` that catches ``RuntimeError`` keeps working when it calls fusedformer.
"""


class InputError(ValueError, RuntimeError):
    """An argument has the wrong shape, value or device."""


class InputTypeError(TypeError, RuntimeError):
    """An argument has the wrong kind or dtype."""
