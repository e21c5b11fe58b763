"""The installed package: every package folder listed in pyproject.toml under ``kd_lightning``, the shipped
configs installed with it, a LICENSE matching the declared license, one version, demo-only dependencies
as an extra."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import kd_lightning
from kd_lightning.shipped import shipped_configs

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _folders_with_init(top: str) -> set[str]:
    """Dotted names, relative to ``top``, of the folders under it that hold an ``__init__.py``."""
    base = ROOT / top
    return {
        ".".join(p.parent.relative_to(base).parts)
        for p in base.rglob("__init__.py")
        if ".venv" not in p.parts
    }


def test_every_package_folder_is_installed_under_kd_lightning():
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    expected = set()
    for package, folder in mapping.items():
        for sub in _folders_with_init(folder):
            expected.add(f"{package}.{sub}" if sub else package)
    # Data-only packages (no __init__.py): mapped, listed and given their package data.
    expected |= {package for package in setuptools["package-data"] if package in mapping}
    # A folder mapped on its own is not also a subpackage of the folder that contains it.
    assert set(setuptools["packages"]) == expected
    assert all(p == "kd_lightning" or p.startswith("kd_lightning.") for p in setuptools["packages"])


def test_callbacks_and_datamodules_import_under_kd_lightning():
    callbacks = importlib.import_module("kd_lightning.callbacks")
    datamodules = importlib.import_module("kd_lightning.datamodules")
    assert Path(callbacks.__file__).resolve().parent == ROOT / "callbacks"
    assert Path(datamodules.__file__).resolve().parent == ROOT / "datamodules"
    assert callbacks.SoftTargetCache.__module__ == "kd_lightning.callbacks.soft_target_cache"


def test_configs_are_package_data_from_the_top_level_folder():
    """configs/ stays the source of truth; a wheel installs it as kd_lightning/configs (every YAML file)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"]["kd_lightning.configs"] == "configs"
    patterns = setuptools["package-data"]["kd_lightning.configs"]
    shipped = sorted((ROOT / "configs").rglob("*.yaml"))
    assert shipped and all(any(p.relative_to(ROOT / "configs").match(g) for g in patterns) for p in shipped)
    assert shipped_configs() == ROOT / "configs"  # a checkout (editable install included) reads them in place


def test_license_file_matches_pyproject():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190  # the full text


def test_version_is_written_once():
    """pyproject.toml reads the version from kd_lightning.__version__ (no second copy); `kd --version` prints it."""
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kd_lightning.__version__"}
    tree = ast.parse((ROOT / "kd_lightning/__init__.py").read_text())
    assigned = [
        n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"
    ]
    assert assigned == [kd_lightning.__version__]  # a literal: setuptools reads it without importing torch


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at a module's top level (not inside functions): what importing it costs."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def test_demo_dependencies_are_an_extra_the_library_does_not_import():
    """mnist1d (the MNIST-1D demo source) is the `demo` extra, in `dev` too (`make setup`); no module of the
    library imports it at import time."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    base = " ".join(PYPROJECT["project"]["dependencies"])
    assert "mnist1d" not in base and any(d.startswith("mnist1d") for d in optional["demo"])
    assert "kd-lightning[demo]" in optional["dev"]
    assert "'.[dev]'" in (ROOT / "Makefile").read_text()
    for folder in ("kd_lightning", "callbacks", "datamodules"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "mnist1d" not in _top_level_imports(path), path


def _can_build_wheels() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").partition(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77  # pyproject's build requirement (PEP 639 license fields, bdist_wheel built in)


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools >= 77 here to build offline")
def test_wheel_installs_configs_license_and_version(tmp_path):
    """Build the wheel offline from a copy of the sources, then install it into a folder: the configs come
    with the package (and kd_lightning.shipped finds them there), the LICENSE in its metadata, one version."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("kd_lightning", "callbacks", "datamodules", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = [
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(tmp_path),
        str(source),
    ]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kd_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"kd_lightning/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
        for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert configs <= names
    info = f"kd_lightning-{kd_lightning.__version__}.dist-info"
    assert wheel.name.startswith(f"kd_lightning-{kd_lightning.__version__}-")
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"Version: {kd_lightning.__version__}" in metadata and "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: mnist1d>=0.0.2; extra == "demo"' in metadata
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = "from kd_lightning.shipped import shipped_configs; print(shipped_configs())"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,  # not the checkout, whose kd_lightning would come first
    )
    assert Path(done.stdout.strip()) == target / "kd_lightning" / "configs"
