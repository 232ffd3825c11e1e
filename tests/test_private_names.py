"""No module uses another module's private names (``_x``): what is shared across modules is made public.

Checked over ``src/medvlm``, ``benchmarks/`` and ``scripts/`` by walking each file's AST:

- ``from M import _x`` and ``import M._x`` (any ``M``: medvlm's own modules, the standard library, third parties);
- ``N._x`` where ``N`` is a name the file imports (a module or a class from elsewhere);
- ``expr._x`` on any other object than ``self`` / ``cls`` when no ``_x`` is defined in the file itself (a private
  attribute of an object from another module, such as ``asyncio.Semaphore._value``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = (ROOT / "src" / "medvlm", ROOT / "benchmarks", ROOT / "scripts")

# Private by spelling, public by contract: transformers documents ``_no_split_modules`` as the model attribute that
# names the blocks FSDP / device maps must keep whole, and accelerate reads it the same way.
ALLOWED_ATTRIBUTES = {"_no_split_modules"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_here(tree: ast.AST) -> set[str]:
    """Names the file defines itself: functions, classes, assignments (``x = ``, ``self.x = ``), parameters."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def private_uses(source: str) -> list[str]:
    """Each use of another module's private name in ``source``, as ``line: what``."""
    tree = ast.parse(source)
    imported: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                imported.add(a.asname or a.name)
                if _private(a.name):
                    found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                imported.add(a.asname or a.name.split(".")[0])
                if any(_private(p) for p in a.name.split(".")):
                    found.append(f"{node.lineno}: import {a.name}")
    mine = _defined_here(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in ALLOWED_ATTRIBUTES:
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in imported:
            found.append(f"{node.lineno}: {base.id}.{node.attr}")
        elif not (isinstance(base, ast.Name) and base.id in ("self", "cls")) and node.attr not in mine:
            found.append(f"{node.lineno}: {ast.unparse(base)}.{node.attr}")
    return found


def test_no_module_uses_a_private_name_of_another():
    bad = []
    for tree in TREES:
        for f in sorted(tree.rglob("*.py")):
            bad += [f"{f.relative_to(ROOT)}:{use}" for use in private_uses(f.read_text(encoding="utf-8"))]
    assert not bad, "private names used across modules (make them public, or keep the use inside):\n" + "\n".join(bad)


def test_the_check_sees_each_kind_of_use():
    source = (
        "import asyncio\n"
        "from medvlm.eval.vqa import _progress\n"
        "from medvlm.eval import vqa\n"
        "import pkg._impl\n"
        "class Own:\n"
        "    _slots = 1\n"
        "    def f(self, other):\n"
        "        vqa._helper()\n"
        "        asyncio.Semaphore(1)._value\n"
        "        return other._slots + self._anything\n"
    )
    uses = private_uses(source)
    assert sorted(uses) == [
        "2: from medvlm.eval.vqa import _progress",
        "4: import pkg._impl",
        "8: vqa._helper",
        "9: asyncio.Semaphore(1)._value",
    ], uses
