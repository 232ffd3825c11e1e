"""Imports point one way: utils/llm -> data -> model -> train -> infer -> eval -> serve -> cli/demo."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medvlm"
LAYERS = {
    "notice": 0,
    "errors": 0,
    "utils": 0,
    "llm": 0,
    "data": 1,
    "model": 2,
    "train": 3,
    "infer": 4,
    "eval": 5,
    "serve": 6,
    "demo": 7,
    "cli": 8,
    "__main__": 8,
    "__init__": 0,
}


def _layer(parts: tuple[str, ...]) -> int:
    return LAYERS[parts[0]]


def _medvlm_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "medvlm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "medvlm":
                out.append(node.module)
    return out


def test_every_package_has_a_layer():
    for p in SRC.iterdir():
        if p.name.startswith(".") or p.name == "__pycache__" or p.name == "resources":
            continue
        assert p.stem in LAYERS, f"{p.name}: new top-level module/package needs a layer in this test"


def test_imports_point_one_way():
    bad = []
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("").parts
        mine = _layer(rel)
        for mod in _medvlm_imports(f):
            parts = tuple(mod.split(".")[1:]) or ("__init__",)
            if _layer(parts) > mine:
                bad.append(f"{'/'.join(rel)}.py imports {mod}")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_no_pickle_loading_and_no_remote_code():
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        for needle in ("pickle.load", "trust_remote_code=True", "torch.load(", "weights_only=False"):
            if needle in text:
                offenders.append(f"{f.relative_to(SRC)}: {needle}")
    assert not offenders, offenders
