"""The installed package layout: every package folder is listed in pyproject.toml, under ``kd_lightning``."""

from __future__ import annotations

import importlib
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _folders_with_init(top: str) -> set[str]:
    """Dotted names, relative to ``top``, of the folders under it that hold an ``__init__.py``."""
    base = ROOT / top
    return {
        ".".join(p.parent.relative_to(base).parts)
        for p in base.rglob("__init__.py")
        if ".venv" not in p.parts
    }


def test_every_package_folder_is_installed_under_kd_lightning():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    expected = set()
    for package, folder in mapping.items():
        for sub in _folders_with_init(folder):
            expected.add(f"{package}.{sub}" if sub else package)
    # A folder mapped on its own is not also a subpackage of the folder that contains it.
    assert set(setuptools["packages"]) == expected
    assert all(p == "kd_lightning" or p.startswith("kd_lightning.") for p in setuptools["packages"])


def test_callbacks_and_datamodules_import_under_kd_lightning():
    callbacks = importlib.import_module("kd_lightning.callbacks")
    datamodules = importlib.import_module("kd_lightning.datamodules")
    assert Path(callbacks.__file__).resolve().parent == ROOT / "callbacks"
    assert Path(datamodules.__file__).resolve().parent == ROOT / "datamodules"
    assert callbacks.SoftTargetCache.__module__ == "kd_lightning.callbacks.soft_target_cache"
