"""Keel's layering holds: the import-linter contracts in pyproject.toml ([tool.importlinter]) pass.

The contracts say which package may import which (entry points > composition root > features > backends >
kernel, type-checking imports included) and that no package's modules import each other in a cycle. A
function-level import counts like any other, so it cannot hide an upward import or a cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "agents", "prompts", "evals", "finetune", "ingest")


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = proc.stdout + proc.stderr
    assert "broken" in report.lower() or "kept" in report.lower(), report  # it really ran the contracts
    assert proc.returncode == 0, report


def test_lazy_imports_of_keel_modules_say_why():
    """A function-level import of a Keel module is allowed only where it defers something heavy or optional
    (a model library, a database driver, a backend that is not configured); the line or the one above says
    so with a ``# lazy:`` comment, so nobody mistakes it for a way around the layers."""
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            source = path.read_text()
            lines = source.splitlines()
            tree = ast.parse(source)
            top = {id(n) for n in _module_level_imports(tree.body)}
            for node in ast.walk(tree):
                if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in top:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not any(n.split(".")[0] in PACKAGES for n in names) and not getattr(node, "level", 0):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "# lazy:" not in here and "# lazy:" not in above:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not missing, ("function-level imports of Keel modules without a '# lazy: <why>' comment (move them to "
                         "the top, or say what they defer):\n" + "\n".join(missing))


def _module_level_imports(body):
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If | ast.Try):
            yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
            for handler in getattr(node, "handlers", []):
                yield from _module_level_imports(handler.body)
            yield from _module_level_imports(getattr(node, "finalbody", []))
