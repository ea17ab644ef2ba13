"""``python -m fusedformer.train``: the same as the ``fusedformer-train`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
