"""Every command of the README runs, at a tiny budget, or is listed in :data:`CANNOT_RUN` with the reason.

**What counts as a command.** The lines of the README's fenced code blocks whose info string is ``bash``,
``sh``, ``shell`` or ``console`` (in a ``console`` block only the lines that start with ``$ ``; the others
are output). A line ending in ``\\`` continues on the next; ``#`` starts a comment and words are split as a
shell splits them (:func:`shlex.split`); leading ``NAME=value`` words set environment variables. Blocks of
other languages (``yaml``, ``python``, plain output) hold no commands; the ``python`` blocks are checked to
compile and import (:func:`test_python_blocks_compile_and_import`).

**How each command is checked**, by its first words (:func:`how_checked`):

- ``kd fit|validate|test|predict ...``: run in this process by :func:`kd_lightning.cli.console` (what the
  ``kd`` script runs) with :data:`TINY` appended (one epoch of two batches, no logger, CPU), and tiny data:
  a config reading an ``ImageFolder`` gets a generated folder of 32x32 pictures where the command points it,
  ``tiny_images.SMALL_IMAGES`` and no weights download; one reading Fashion-MNIST gets :data:`FEW_FASHION_MNIST`
  (skipped without the files: ``make data``).
- ``kd <workflow> ...`` (``kd stage``, ``kd members``, ...): the same, with those arguments after ``--``
  (the arguments of every fit the workflow runs).
- ``kd --help``, ``kd --version``, ``kd configs``: as written (``kd configs`` in an empty directory).
- ``make TARGET``: ``make -n TARGET`` succeeds in the checkout (the target exists; nothing runs).
- ``python scripts/NAME.py ...``: ``python scripts/NAME.py --help`` exits with 0.

The ``kd`` commands run in the README's order in one working directory, as a user would type them (a
teacher's checkpoint written by one command is read by the next), so run this file as a whole. A command
that fits none of these rules and is not in :data:`CANNOT_RUN` fails :func:`test_every_command_is_checked`.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tiny_images import SMALL_IMAGES

from kd_lightning.cli import console
from kd_lightning.datamodules import FashionMNIST
from kd_lightning.workflows import WORKFLOWS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
LIGHTNING = ("fit", "validate", "test", "predict")

CANNOT_RUN: dict[str, str] = {
    # Installs into the running environment and fetches dependencies from the package index (no network in
    # tests). tests/test_packaging.py builds the wheel and checks that it holds the package and the configs.
    "pip install .": "installs packages (network); the wheel is checked by tests/test_packaging.py",
}
"""Commands of the README that the tests cannot run, each with the reason (GPU, SLURM, several machines,
the internet, installing packages). An entry that is no longer in the README is an error too."""

TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.limit_predict_batches=2",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",  # W&B (offline) and CSV are tested in test_wandb.py and test_cli.py
    "--data.init_args.num_workers=0",
]
"""Appended to every ``kd fit|validate|test|predict``: the command as written, at the smallest budget."""

FEW_FASHION_MNIST = ["--data.init_args.train_fraction=0.02", "--data.init_args.val_size=200"]
"""For Fashion-MNIST configs: fewer training and validation images, so that a soft-target store builds fast."""


@dataclass(frozen=True)
class Command:
    """One README command: its text as written (continuations joined), its words and environment."""

    text: str
    words: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    line: int


def fenced_blocks(markdown: str) -> list[tuple[str, int, list[str]]]:
    """The fenced code blocks of ``markdown``: (info string, line number of the first content line, lines).

    Example:
        >>> fenced_blocks("text\\n```bash\\nkd --help\\n```\\n")
        [('bash', 3, ['kd --help'])]
    """
    blocks, info, start, lines = [], None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            if info is None:
                info, start, lines = line[3:].strip(), number + 1, []
            else:
                blocks.append((info, start, lines))
                info = None
        elif info is not None:
            lines.append(line)
    return blocks


def commands_in(markdown: str) -> list[Command]:
    """The commands of ``markdown``'s shell blocks, in order (the convention of this module's docstring).

    Example:
        >>> text = "```bash\\nOMP_NUM_THREADS=1 kd fit --config a.yaml \\\\\\n  --x='[0, 1]'   # note\\n```\\n"
        >>> [(c.words, c.env) for c in commands_in(text)]
        [(('kd', 'fit', '--config', 'a.yaml', '--x=[0, 1]'), (('OMP_NUM_THREADS', '1'),))]
        >>> commands_in("```console\\n$ kd --version\\nkd-lightning 1.0\\n```\\n")[0].words
        ('kd', '--version')
    """
    found = []
    for info, start, lines in fenced_blocks(markdown):
        if info not in SHELL_BLOCKS:
            continue
        pending, first = "", start
        for number, line in enumerate(lines, start):
            if info == "console" and not pending:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending:
                first = number
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            words = shlex.split(pending + line, comments=True)
            pending = ""
            env = []
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env.append((name, value))
            if words:
                found.append(Command(shlex.join(words), tuple(words), tuple(env), first))
    return found


def how_checked(command: Command) -> str:
    """How the tests check ``command``: ``kd``, ``make``, ``script``, ``cannot run``, or ``unknown``."""
    words = command.words
    if command.text in CANNOT_RUN:
        return "cannot run"
    if (
        words[0] == "kd"
        and len(words) > 1
        and words[1] in (*LIGHTNING, *WORKFLOWS, "configs", "--help", "--version")
    ):
        return "kd"
    if words[0] == "make" and len(words) == 2 and re.fullmatch(r"[a-z][a-z-]*", words[1]):
        return "make"
    if words[0] in ("python", "python3") and len(words) > 1 and re.fullmatch(r"scripts/\w+\.py", words[1]):
        return "script"
    return "unknown"


COMMANDS = commands_in(README.read_text())


def test_the_readme_has_its_commands():
    """The parser finds what a newcomer needs: the two commands, the ImageFolder pair, kd's basics."""
    texts = [c.text for c in COMMANDS]
    assert texts[:2] == ["make demo", "make test"], texts[:2]
    assert sum("configs/imagefolder/" in t for t in texts) == 2
    assert {"kd --help", "kd configs"} <= set(texts)


def test_every_command_is_checked():
    """A README command that no rule runs must be listed in CANNOT_RUN with its reason, and vice versa."""
    unknown = [f"README.md:{c.line}: {c.text}" for c in COMMANDS if how_checked(c) == "unknown"]
    assert not unknown, (
        "README commands that tests/test_readme.py neither runs nor lists in CANNOT_RUN (add a rule, or an "
        "entry with the reason it cannot run here):\n" + "\n".join(unknown)
    )
    stale = set(CANNOT_RUN) - {c.text for c in COMMANDS}
    assert not stale, f"CANNOT_RUN lists commands that are no longer in the README: {sorted(stale)}"


def test_python_blocks_compile_and_import():
    """The README's Python blocks are valid Python whose imports exist (running them needs a trained teacher)."""
    blocks = [lines for info, _, lines in fenced_blocks(README.read_text()) if info == "python"]
    assert blocks
    for lines in blocks:
        tree = ast.parse("\n".join(lines))
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), "README.md", "exec"), {})


# ----- the commands, in the README's order -------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The directory the README's ``kd`` commands share, with the repository's configs at ``configs/``."""
    path = tmp_path_factory.mktemp("readme")
    (path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    (path / "small_images.yaml").write_text(SMALL_IMAGES)
    return path


def option(words: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``words`` (the last one given), else None."""
    value = None
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(name + "="):
            value = word.partition("=")[2]
    return value


def write_pictures(root: Path) -> None:
    """A tiny image folder: 3 classes, 6 training and 2 validation PNGs each (one colour channel per class)."""
    if (root / "train").is_dir():
        return
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(("circle", "square", "stripe")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (32, 36 + 4 * (i % 3), 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def tiny_data(args: list[str], workdir: Path) -> list[str]:
    """Arguments that give the config of ``args`` tiny data (writing the pictures an ImageFolder needs)."""
    config = option(args, "--config")
    if config is None or not (workdir / config).is_file():  # kd names the missing file itself
        return []
    text = (workdir / config).read_text()
    extra: list[str] = []
    if "kd_lightning.datamodules.FashionMNIST" in text:
        if not FashionMNIST().available():
            pytest.skip("Fashion-MNIST files missing: run `make data`")
        extra += FEW_FASHION_MNIST
    if "kd_lightning.datamodules.ImageFolder" in text:
        root = option(args, "--data.init_args.source.init_args.root")
        root = root or yaml.safe_load(text)["data"]["init_args"]["source"]["init_args"]["root"]
        write_pictures(workdir / root)
        net = "student" if "student:" in text else "net"
        # In YAML: jsonargparse reads `--...weights=null` on the command line as the string 'None'.
        no_download = workdir / f"no_download_{net}.yaml"
        no_download.write_text(f"model: {{init_args: {{{net}: {{init_args: {{weights: null}}}}}}}}\n")
        extra += ["--config", "small_images.yaml", "--config", no_download.name]
    return extra


def run_kd(argv: list[str]) -> None:
    """``kd ARGV`` in this process; a ``SystemExit`` other than 0 fails the test."""
    try:
        console(argv)
    except SystemExit as done:
        assert done.code in (0, None), f"kd {shlex.join(argv)} exited with {done.code}"


def kd_arguments(command: Command, workdir: Path) -> list[str]:
    """``command``'s ``kd`` arguments with the tiny budget and data of this module's docstring."""
    args = list(command.words[1:])
    if args[0] in LIGHTNING:
        return [*args, *TINY, *tiny_data(args, workdir)]
    if args[0] in WORKFLOWS:
        tiny = [*TINY, *tiny_data(args, workdir)]
        return [*args, *tiny] if "--" in args else [*args, "--", *tiny]
    return args


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if how_checked(c) == "kd"],
    ids=lambda c: f"line{c.line}-{c.text[:60]}",
)
def test_kd_command_runs(command, workdir, tmp_path, monkeypatch, capsys):
    for name, value in command.env:
        monkeypatch.setenv(name, value)
    if command.words[1] == "configs":  # writes ./configs: in an empty directory
        monkeypatch.chdir(tmp_path)
        run_kd(list(command.words[1:]))
        assert (tmp_path / "configs/fashion_mnist/teacher.yaml").is_file()
        return
    monkeypatch.chdir(workdir)
    run_kd(kd_arguments(command, workdir))
    out = capsys.readouterr().out
    if command.words[1] == "--help":
        assert "fit" in out and "stage" in out
    elif command.words[1] == "--version":
        assert out.startswith("kd-lightning ")
    elif "--print_config" in command.words:
        assert "class_path" in out


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if how_checked(c) in ("make", "script")], ids=lambda c: c.text[:60]
)
def test_command_is_there(command):
    """``make TARGET``: ``make -n TARGET`` prints the target's recipe without running it (and fails for an
    unknown target). ``python scripts/NAME.py ...``: the script answers ``--help`` (it is not run)."""
    if how_checked(command) == "make":
        if shutil.which("make") is None:
            pytest.skip("`make` is not installed")
        argv = ["make", "-n", *command.words[1:]]
    else:
        argv = [sys.executable, command.words[1], "--help"]
    env = {**os.environ, **dict(command.env)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command.text}: {done.stderr.strip()[-2000:]}"
