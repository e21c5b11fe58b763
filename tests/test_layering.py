"""Dependencies run one way: ``callbacks/`` and ``datamodules/`` use the library, never the reverse.

Read from the source with :mod:`ast`, so an import hidden inside a function counts too. The one
exception is the ``kd`` entry point (``kd_lightning/cli.py``), which assembles everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTER = ("kd_lightning.callbacks", "kd_lightning.datamodules")
# Modules of the library allowed to import the outer packages: the entry point and the workflows, which
# assemble callbacks and DataModules into runs.
ASSEMBLERS = ("kd_lightning/cli.py", "kd_lightning/workflows/")


def imported_modules(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from kd_lightning.callbacks import X\n")
    assert {"os", "kd_lightning.callbacks", "kd_lightning.callbacks.X"} <= imported_modules(f)


def test_library_never_imports_callbacks_or_datamodules():
    offenders = {}
    for path in sorted((ROOT / "kd_lightning").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ASSEMBLERS):
            continue
        bad = sorted(m for m in imported_modules(path) if m.startswith(OUTER))
        if bad:
            offenders[rel] = bad
    assert offenders == {}, f"library modules importing the outer packages: {offenders}"


def test_datamodules_never_import_callbacks_and_the_reverse():
    for folder, other in (
        ("datamodules", "kd_lightning.callbacks"),
        ("callbacks", "kd_lightning.datamodules"),
    ):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = sorted(m for m in imported_modules(path) if m.startswith(other))
            assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"
