"""The configs kd-lightning ships, wherever it is installed from.

The repository's top-level ``configs/`` is their source of truth. A wheel (``pip install kd-lightning`` or
``pip install .``) installs a copy as package data, ``kd_lightning/configs/`` (``pyproject.toml``:
``"kd_lightning.configs" = "configs"``); a checkout, editable install included, reads ``configs/`` itself.
``kd configs DEST`` copies them out (:func:`copy_configs`), so that a user who installed from a wheel can run
``kd fit --config DEST/fashion_mnist/teacher.yaml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped_configs() -> Path:
    """The folder of the shipped configs: ``kd_lightning/configs`` when installed from a wheel, else the
    checkout's ``configs/`` (beside ``pyproject.toml``).

    Example:
        >>> (shipped_configs() / "fashion_mnist" / "teacher.yaml").is_file()
        True
    """
    installed = PACKAGE / "configs"
    return installed if installed.is_dir() else PACKAGE.parent / "configs"


def copy_configs(dest: str | Path = "configs", overwrite: bool = False) -> list[Path]:
    """Copy the shipped configs (every dataset's folder of ``kd`` YAML files) into ``dest``.

    Args:
        dest: folder to copy them into (created; ``configs`` by default, so the commands of the docs run as written).
        overwrite: replace files that already exist in ``dest``; without it an existing file stops the copy
            before anything is written.

    Returns:
        The files written, sorted.

    Raises:
        FileNotFoundError: this installation has no shipped configs.
        FileExistsError: a file of ``dest`` would be overwritten and ``overwrite`` is false (the message names it).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     written = copy_configs(Path(tmp) / "configs")
        ...     (Path(tmp) / "configs" / "fashion_mnist" / "teacher.yaml").is_file()
        True
    """
    source = shipped_configs()
    if not source.is_dir():
        raise FileNotFoundError(f"no shipped configs in this installation: looked for {source}.")
    dest = Path(dest)
    files = sorted(p.relative_to(source) for p in source.rglob("*.yaml"))
    existing = [dest / f for f in files if (dest / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"`dest`: {len(existing)} of the configs already exist in {dest}, e.g. {existing[0]}; "
            "pass overwrite (kd configs DEST --overwrite) to replace them."
        )
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / f, dest / f)
    return [dest / f for f in files]
