"""Filesystem safety of builds: nothing of the user's is lost, nothing half-written is published.

Temporary and leftover build directories beside a store (recognised by name and header), the checks
before a build (a real write probe, files in the way, files a store did not write), removing only the
files a store wrote, and durable writes (fsync of files and directories).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_lightning.store.format import FORMAT, HEADER, StoreError


def temp_path(path: str | Path, token: str) -> Path:
    """The hidden directory beside ``path`` that a build with ``token`` writes into."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{token}"


def new_token() -> str:
    """A fresh build token (share rank 0's with every process of a distributed build)."""
    return uuid.uuid4().hex[:12]


def _own_files(header: Mapping[str, Any]) -> set[str]:
    # What a store (or a build) writes into its directory: its arrays, its header, the staged header.
    return {*header.get("arrays", {}), HEADER, HEADER + ".new"}


def _raw_header(path: Path) -> dict[str, Any] | None:
    """The header of our format in directory ``path`` (any version, complete or not), or ``None``."""
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None


def foreign_files(path: str | Path) -> list[str]:
    """Names in the store directory ``path`` that its header does not list (so the store did not write).

    Returns ``[]`` when ``path`` is not a directory.

    Raises:
        StoreError: ``path`` is a directory without a header of this format (not a store at all).
    """
    path = Path(path)
    if not path.is_dir():
        return []
    header = _raw_header(path)
    if header is None:
        raise StoreError(
            f"{str(path)!r} is not a soft-target store: it has no {HEADER} of format {FORMAT!r}."
        )
    own = _own_files(header)
    return sorted(p.name for p in path.iterdir() if p.name not in own)


def check_replaceable(path: str | Path) -> None:
    """Raise unless the store at ``path`` (if any) holds only files it wrote, so replacing it loses nothing.

    Raises:
        StoreError: the directory holds a file (or directory) its header does not list; the message names
            it and says what to do. Nothing is deleted.
    """
    path = Path(path)
    extra = foreign_files(path)
    if extra:
        shown = ", ".join(repr(name) for name in extra[:5]) + (
            f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        )
        raise StoreError(
            f"refusing to replace the soft-target store {str(path)!r}: it holds {shown}, which the store did "
            f"not write (its {HEADER} lists {sorted(_raw_header(path).get('arrays', {}))}), and replacing the "
            f"store would delete it. Move {str(path / extra[0])!r} out of the store directory, or choose "
            "another `path`; nothing was deleted."
        )


def check_can_build(path: str | Path) -> None:
    """Check, before any work, that a store can be built at ``path`` and replace what is there.

    The parent directory is created if missing and must take a new file (a real write probe: permission
    bits say nothing to root or on some network filesystems); an existing store directory must take one
    too (renaming a directory into place and deleting the old store need it), and must hold only its own
    files (:func:`check_replaceable`).

    Raises:
        StoreError: a file stands where the store's directory (or one above it) should be, a directory
            cannot be created or written, or the store holds files it did not write; the message names
            the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(
            f"cannot build the soft-target store {str(path)!r}: a file is there, where the store's directory "
            "should be. Move it away, or choose another `path`."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(
            f"cannot build the soft-target store {str(path)!r}: cannot create its directory "
            f"{str(path.parent)!r} ({err}): remove a file in the way, make the directory above it writable, "
            "or choose another `path`."
        ) from err
    _probe(path.parent, f".{path.name}.probe-{new_token()}", path, "a build writes beside the store")
    if path.is_dir():
        check_replaceable(path)
        _probe(path, f".probe-{new_token()}", path, "replacing the store renames it and deletes its files")


def _probe(directory: Path, name: str, store: Path, why: str) -> None:
    probe = directory / name
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise StoreError(
            f"cannot build the soft-target store {str(store)!r}: cannot write in {str(directory)!r} "
            f"({err.strerror}), and {why}: make {str(directory)!r} writable, or choose another `path`."
        ) from err
    os.close(fd)
    os.unlink(probe)


def remove_leftovers(path: str | Path, keep: str | None = None) -> list[Path]:
    """Remove what interrupted builds of the store at ``path`` left beside it; return what was removed.

    Candidates are the directories ``.<name>.tmp-<token>`` (a build killed before its commit) and
    ``.<name>.old-<token>`` (a replaced store killed before its deletion). Only ours are touched: a
    candidate is removed only if it holds a header of this format, and only the files that header lists
    are deleted (header last). Anything else is left where it is, with a warning: a directory of that name
    without our header, a file the header does not list, or a build still running (its header names a
    live process on this host).

    Args:
        path: the store's final directory.
        keep: a build token whose temporary directory is left alone (the build about to start).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".train.tmp-dead").mkdir()
        >>> _ = (root / ".train.tmp-dead" / HEADER).write_text(json.dumps({"format": FORMAT, "arrays": {}}))
        >>> [p.name for p in remove_leftovers(root / "train")], list(root.iterdir())
        (['.train.tmp-dead'], [])
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    for entry in sorted(path.parent.iterdir()):
        if not entry.name.startswith(prefixes) or entry.name.rsplit("-", 1)[-1] == keep:
            continue
        header = _raw_header(entry) if entry.is_dir() and not entry.is_symlink() else None
        if header is None:
            warnings.warn(
                f"{str(entry)!r} is named like a leftover build of the soft-target store {str(path)!r} but "
                f"holds no {HEADER} of format {FORMAT!r}: left as it is. Delete it yourself if it is not yours.",
                stacklevel=2,
            )
            continue
        writer = header.get("build", {}) if header.get("complete") is not True else {}
        if writer.get("host") == socket.gethostname() and _alive(writer.get("pid")):
            warnings.warn(
                f"{str(entry)!r}: a build of {str(path)!r} by process {writer['pid']} on this host, which is "
                "still running: left as it is.",
                stacklevel=2,
            )
            continue
        if _remove_own(entry, header):
            removed.append(entry)
    return removed


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_own(directory: Path, header: Mapping[str, Any]) -> bool:
    """Delete the files a store's header lists (the header last), then the directory if it is empty.

    Returns whether the directory is gone; what else it holds is left there, with a warning.
    """
    for name in [*header.get("arrays", {}), HEADER + ".new", HEADER]:
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        rest = sorted(p.name for p in directory.iterdir())
        warnings.warn(
            f"{str(directory)!r}: removed the soft-target files, left {rest}, which the store did not write.",
            stacklevel=3,
        )
        return False
    return True


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable once its directory is synced; some filesystems cannot open directories.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
