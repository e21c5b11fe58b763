"""One run, one directory: whose checkpoint a file is, never another run's overwritten, a checkpoint on SIGTERM.

The ``kd`` command adds a :class:`RunIdentity` to every run (``--run.overwrite`` is its flag). It

- records the run in every checkpoint the Trainer writes, under ``"kd_run"``: the run directory
  (absolute), the seed and the W&B run id, so a later run tells its own checkpoints from another run's
  and a resumed fit continues the same W&B run;
- refuses to start a fit whose ModelCheckpoint callbacks would write over a checkpoint file of another
  run (another run directory or seed, or a file that records no run), naming the file, unless
  ``overwrite=True`` or the callback's ``enable_version_counter`` writes beside the file instead;
- on SIGTERM saves ``last.ckpt`` where the first ``save_last`` ModelCheckpoint keeps it: Lightning 2.6
  only notes the signal and stops at the next batch boundary by raising ``SIGTERMException`` (only
  SIGUSR1 under SLURM auto-requeue saves an ``hpc_ckpt``), so without this a job preempted with SIGTERM
  alone leaves nothing newer than its last periodic checkpoint;
- saves the random generators (torch CPU and CUDA, numpy, Python) with each checkpoint and restores them
  just before the first training batch after a resume is fetched: Lightning does not, and the batches after a mid-epoch
  checkpoint then draw the same dropout masks, and the later epochs the same order, as an uninterrupted run;
- makes sure a resumed training loader gets its place in the epoch back (see :meth:`on_train_start`).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

RUN_KEY = "kd_run"
HPC_PREFIX = "hpc_ckpt_"


def seed_name(seed: int | None) -> str:
    """The directory of one seed of a run: ``seed<seed>``, ``unseeded`` without a seed.

    Example:
        >>> seed_name(3), seed_name(None)
        ('seed3', 'unseeded')
    """
    return "unseeded" if seed is None else f"seed{seed}"


def run_name(root_name: str, seed: int | None, stage: str | None = None) -> str:
    """The W&B name of a run: ``<stage>-<root name>-seed<seed>``, the stage (a logger's ``job_type``) left
    out when the root's name already starts with it. The root's name carries a member's or specialist's
    index (the workflows give each its own root: ``member_<k>``, ``group<g>``).

    Example:
        >>> run_name("teacher", 0, "teacher"), run_name("group3", 1, "specialist"), run_name("member_2", 2, "member")
        ('teacher-seed0', 'specialist-group3-seed1', 'member_2-seed2')
        >>> run_name("x", None)
        'x-unseeded'
    """
    parts = [root_name, seed_name(seed)]
    if stage and not root_name.startswith(stage):
        parts.insert(0, stage)
    return "-".join(parts)


def run_directory(root: str | Path, seed: int | None) -> Path:
    """The run directory of ``root`` (``trainer.default_root_dir``) and ``seed``: ``root/seed<seed>``,
    or ``root`` itself when it already is that seed's directory (a run's saved config given back).

    Example:
        >>> str(run_directory("runs/teacher", 0)), str(run_directory("runs/teacher/seed0", 0))
        ('runs/teacher/seed0', 'runs/teacher/seed0')
    """
    root = Path(root)
    return root if root.name == seed_name(seed) else root / seed_name(seed)


def identity(run_dir: str | Path, seed: int | None) -> dict[str, Any]:
    """What makes a run the same run: its absolute run directory and its seed."""
    return {"run_dir": str(Path(run_dir).absolute().resolve()), "seed": seed}


def read_run_record(path: str | Path) -> dict[str, Any] | None:
    """The ``"kd_run"`` record of checkpoint ``path``, or ``None`` when it records no run.

    Raises:
        ValueError: ``path`` cannot be read as a checkpoint (the message names it).
    """
    try:
        # mmap: the record is read without loading the tensors of a large checkpoint.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{str(path)!r} cannot be read as a checkpoint ({type(err).__name__}: {err})."
        ) from err
    record = checkpoint.get(RUN_KEY) if isinstance(checkpoint, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def written_files(callback: ModelCheckpoint) -> list[Path]:
    """The fixed-name files ``callback`` would write over: ``<filename>.ckpt`` and ``last.ckpt`` (with
    ``save_last``); none with ``enable_version_counter`` (it writes ``-v1`` beside an existing file) and
    none for templated names (``{epoch}``), which change from run to run."""
    # Lightning keeps the flag private; it decides whether an existing file is overwritten.
    if callback.dirpath is None or callback._enable_version_counter:
        return []
    names = []
    if callback.filename and "{" not in callback.filename:
        names.append(callback.filename + callback.FILE_EXTENSION)
    if callback.save_last:
        names.append(callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return [Path(callback.dirpath) / name for name in names]


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest checkpoint a run can resume from: ``last*.ckpt`` of its ModelCheckpoint directories (what
    Lightning's ``ckpt_path="last"`` looks for) or an ``hpc_ckpt_<n>.ckpt`` in its root directory (what a
    SIGUSR1 requeue writes); ``None`` when there is none."""
    candidates: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            directory = Path(callback.dirpath)
            if directory.is_dir():
                candidates += [p for p in directory.glob("last*.ckpt") if p.is_file()]
    root = Path(trainer.default_root_dir)
    if root.is_dir():
        candidates += [p for p in root.glob(f"{HPC_PREFIX}*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def _rng_states() -> dict[str, Any]:
    # Tensors and plain numbers only: Lightning loads checkpoints with torch's weights_only default.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }
    states["numpy"].update(has_gauss=int(has_gauss), gauss=float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunIdentity(Callback):
    """Record the run in its checkpoints, refuse to overwrite another run's, save ``last.ckpt`` on SIGTERM.

    Args:
        run_dir: the run directory (default: the Trainer's ``default_root_dir``).
        seed: the run's seed (``None``: unseeded).
        overwrite: write over checkpoint files of another run instead of refusing to start.
    """

    def __init__(self, run_dir: str | None = None, seed: int | None = None, overwrite: bool = False) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.overwrite = overwrite
        self._rng: Mapping[str, Any] | None = None

    def identity(self, trainer: L.Trainer) -> dict[str, Any]:
        """This run's identity (see :func:`identity`)."""
        return identity(self.run_dir or trainer.default_root_dir, self.seed)

    def check(self, trainer: L.Trainer) -> None:
        """Raise if a checkpoint file this fit would write belongs to another run (and ``overwrite`` is off).

        Raises:
            FileExistsError: naming the file, whose run it is, and the two ways to go on.
        """
        if self.overwrite:
            return
        mine = self.identity(trainer)
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            for path in written_files(callback):
                if not path.is_file():
                    continue
                try:
                    record = read_run_record(path)
                except ValueError as err:
                    owner = f"something unreadable ({err})"
                else:
                    if record is not None and {k: record.get(k) for k in mine} == mine:
                        continue
                    owner = (
                        "a checkpoint that records no run (written before runs were recorded, or elsewhere)"
                        if record is None
                        else f"a checkpoint of another run (run directory {record.get('run_dir')!r}, "
                        f"seed {record.get('seed')!r})"
                    )
                raise FileExistsError(
                    f"{str(path)!r} is {owner}, and this run (run directory {mine['run_dir']!r}, seed "
                    f"{mine['seed']!r}) would overwrite it. Give this run its own directory "
                    "(--trainer.default_root_dir) or seed, move the file away, or pass --run.overwrite=true "
                    "to replace it (or set enable_version_counter: true on the ModelCheckpoint to write "
                    "beside it)."
                )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        ids = [lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.version]
        checkpoint[RUN_KEY] = {**self.identity(trainer), "wandb_id": ids[0] if ids else None}
        checkpoint[RUN_KEY]["rng"] = _rng_states()

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._rng = (checkpoint.get(RUN_KEY) or {}).get("rng")
        rank_zero_info(
            f"Resuming at global step {checkpoint.get('global_step')} (epoch {checkpoint.get('epoch')}) of the "
            f"run recorded as { ({k: v for k, v in (checkpoint.get(RUN_KEY) or {}).items() if k != 'rng'}) }."
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 hands a resumed loader its position in FitLoop.setup_data, which returns early when
        # the loaders were already set up, as `trainer.estimated_stepping_batches` does from
        # configure_optimizers (every lr schedule here): the position would be dropped without a word.
        # This is Lightning's own loading step (a no-op once done), before the first batch is drawn.
        trainer.fit_loop._load_combined_loader_states()
        # Lightning calls no epoch-start hook when it restarts mid-epoch; this is the last hook before the
        # first batch is fetched (a random augmentation draws there) and trained on (dropout). The loader's
        # iterator, which draws a seed of its own, exists by now, so from a mid-epoch checkpoint the draws
        # follow those of an uninterrupted run.
        if self._rng is not None:
            _set_rng_states(self._rng)
            self._rng = None

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save_on_sigterm(trainer)

    def _save_on_sigterm(self, trainer: L.Trainer) -> None:
        keeper = next(
            (
                c
                for c in trainer.checkpoint_callbacks
                if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath
            ),
            None,
        )
        if keeper is None:
            rank_zero_warn(
                "SIGTERM: no ModelCheckpoint with save_last, so no checkpoint was saved to resume from."
            )
            return
        path = Path(keeper.dirpath) / f"{keeper.CHECKPOINT_NAME_LAST}{keeper.FILE_EXTENSION}"
        trainer.save_checkpoint(path)  # collective: every rank stopped at the same batch
        rank_zero_info(
            f"SIGTERM: saved {path} at global step {trainer.global_step}; resume with --ckpt_path last."
        )
