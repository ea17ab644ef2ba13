"""What a conversion is made of: :class:`Rule` (which class becomes which fused class, and when not)
and :class:`ConversionReport` (what ``convert`` did).

A leaf module: it imports nothing of fusedformer, so the per-family modules (``torch_nn``,
``hf_*``), the registry and ``convert`` can all import it without an import circle.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn


@dataclass(frozen=True)
class Rule:
    """Convert modules of exactly ``source`` into ``target`` (a ``FusedModule`` subclass).

    ``unsupported(module)`` returns why this module must stay as it is, or None; ``notes(module)``
    returns remarks for the report about a module that is converted (say, a part left unfused)."""
    source: type
    target: type
    unsupported: Callable[[nn.Module], Optional[str]] = lambda module: None
    notes: Callable[[nn.Module], list] = lambda module: []


@dataclass
class ConversionReport:
    """What ``convert`` did.

    Attributes:
        converted: qualified names of the modules swapped for fused ones (``''`` is the root).
        skipped: ``(name, reason)`` for modules of a supported kind that were left untouched.
        notes: ``(name, remark)`` about converted modules (parts left unfused, settings changed).
        backend: the backend the converted modules remember (None = chosen at call time).
    """
    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    backend: Optional[str] = None
    kinds: dict = field(default_factory=dict, repr=False)   # converted name -> original class name

    def __str__(self) -> str:
        backend = self.backend or "chosen at call time (use_backend / FUSEDFORMER_BACKEND / automatic)"
        counts = Counter(self.kinds.get(n, "?") for n in self.converted)
        kinds = ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())) or "nothing"
        lines = [f"fusedformer.convert: converted {kinds}; backend: {backend}"]
        for n in self.converted:
            lines.append(f"  converted  {n or '<root>'} ({self.kinds.get(n, '?')})")
        for n, why in self.skipped:
            lines.append(f"  untouched  {n or '<root>'}: {why}")
        for n, note in self.notes:
            lines.append(f"  note       {n or '<root>'}: {note}")
        return "\n".join(lines)
