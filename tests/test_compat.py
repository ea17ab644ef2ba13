"""Private torch APIs are named in ``python/fusedformer/_compat.py`` only.

A private use is a dotted name under ``torch`` with a component that starts with one underscore
(``torch._C``, ``torch._dynamo.config``, ``torch.utils._pytree``, ``torch.ops.aten._foo``), reached
by attribute access (also through an alias: ``import torch.fx as fx``), ``import`` /
``from ... import``, ``getattr(torch..., "_x")`` or a module path string (``import_module("torch._x")``).
Dunders (``torch.__version__``) are public. No exception for ``torch._dynamo.config`` or
``torch._functorch.config``, though torch's docs mention them: their option names change between
releases, which is what _compat is for. (``torch.compiler`` is public and needs none.)

Python files of python/, bench/ and scripts/ are parsed (comments and docstrings do not count);
shell scripts are searched with a regular expression, as are the ``python -c`` snippets in them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "python" / "fusedformer" / "_compat.py"
TREES = ("python", "bench", "scripts")


def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "torch" and any(p.startswith("_") and not (p.startswith("__") and p.endswith("__"))
                                       for p in parts[1:])


def _dotted(node: ast.AST) -> list[str]:
    """``a.b.c`` of an attribute chain as ['a', 'b', 'c'], or [] if it does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return []
    return [node.id] + parts[::-1]


def private_torch_uses(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every private torch use in a Python source."""
    tree = ast.parse(source)
    aliases = {}  # local name -> the torch module path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "torch" or node.module.startswith("torch.")):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # a.b of a.b.c
    found = []

    def resolve(parts: list[str]):
        if parts and parts[0] in aliases:
            return ".".join([aliases[parts[0]]] + parts[1:])
        return None

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            full = resolve(_dotted(node))
            names = [full] if full else []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            base = resolve(_dotted(node.args[0]))
            names = [f"{base}.{node.args[1].value}"] if base else []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                re.fullmatch(r"torch(\.\w+)+", node.value):
            names = [node.value]
        found += [(node.lineno, n) for n in names if _private(n)]
    return sorted(set(found))


SHELL_PRIVATE = re.compile(r"\btorch(\.\w+)*\.(_(?!_)\w*)")


def _sources():
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".sh") and "results" not in path.relative_to(ROOT).parts:
                yield path


def test_private_torch_apis_only_in_compat():
    offenders = []
    for path in _sources():
        if path == COMPAT:
            continue
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if path.suffix == ".py":
            offenders += [f"{rel}:{line}: {name}" for line, name in private_torch_uses(text)]
        else:
            offenders += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                          for m in SHELL_PRIVATE.finditer(text)]
    assert not offenders, ("private torch APIs outside python/fusedformer/_compat.py (add a named function "
                           "there, with a docstring saying why and for which torch):\n" + "\n".join(offenders))


def test_compat_itself_is_where_they_are():
    """The check sees the uses it is meant to catch: _compat's own are found."""
    names = {n for _, n in private_torch_uses(COMPAT.read_text())}
    assert any(n.startswith("torch._C.") for n in names)
    assert "torch._dynamo.config" in names and "torch._functorch.config" in names
    assert "torch._C._profiler._EventType" in names


@pytest.mark.parametrize("src, expected", [
    ("import torch\nx = torch._C._foo()", ["torch._C._foo"]),
    ("import torch._dynamo.config as c", ["torch._dynamo.config"]),
    ("from torch._C._profiler import _EventType", ["torch._C._profiler", "torch._C._profiler._EventType"]),
    ("from torch import _C", ["torch._C"]),
    ("import torch.utils as u\nu._pytree.tree_map", ["torch.utils._pytree.tree_map"]),
    ("from torch.utils import _pytree as p\np.tree_map", ["torch.utils._pytree", "torch.utils._pytree.tree_map"]),
    ("import torch\ntorch.ops.aten._softmax(x)", ["torch.ops.aten._softmax"]),
    ("import torch\ngetattr(torch, '_dynamo')", ["torch._dynamo"]),
    ("import importlib\nimportlib.import_module('torch._inductor.config')", ["torch._inductor.config"]),
    ("import torch\nprint(torch.__version__, torch.compiler.is_compiling())", []),
    ("import torch\nx = '''torch._C in a docstring'''\n# torch._C in a comment", []),
    ("import torch\nfn._dynamo_marked_constant = True\nself._x = torch.ones(1)", []),
])
def test_the_check_catches_each_form(src, expected):
    assert sorted(n for _, n in private_torch_uses(src)) == sorted(expected)


def test_shell_pattern():
    assert SHELL_PRIVATE.search("python -c 'import torch; torch._C._cuda_getDeviceCount()'")
    assert not SHELL_PRIVATE.search("python -c 'import torch; print(torch.__version__, torch.version.cuda)'")
