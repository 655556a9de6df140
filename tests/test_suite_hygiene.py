"""The suite's own rules, checked on its source: every skip says why."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            yield name, node


def test_every_skip_gives_its_reason():
    missing = []
    for path in sorted(TESTS.rglob("*.py")):
        for name, call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            kwargs = {k.arg for k in call.keywords}
            if name == "skipif" and "reason" not in kwargs:
                missing.append(f"{path.relative_to(TESTS)}:{call.lineno} skipif without reason=")
            elif name in ("skip", "skip_or_fail") and not call.args and "reason" not in kwargs \
                    and isinstance(call.func, ast.Attribute | ast.Name) and getattr(call.func, "attr", name) == name:
                missing.append(f"{path.relative_to(TESTS)}:{call.lineno} {name}() without a reason")
            elif name == "importorskip" and "reason" not in kwargs:
                missing.append(f"{path.relative_to(TESTS)}:{call.lineno} importorskip without reason=")
    assert not missing, "skips that do not say why:\n" + "\n".join(missing)
