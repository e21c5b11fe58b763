"""Weights & Biases logging that never blocks a run: online with a key, offline without one.

:class:`KDWandbLogger` is Lightning's :class:`~lightning.pytorch.loggers.WandbLogger` with

- a ``mode`` that defaults to ``"auto"``: ``WANDB_MODE`` when it is set, else ``online`` when an API key
  is found (``WANDB_API_KEY`` or a ``wandb login`` entry in the netrc file), else ``offline`` with one
  line saying how to switch W&B on. An offline run needs no server and no key; ``wandb sync`` uploads
  it later.
- explicit, checked options (``project``, run ``name``, ``group``, ``tags``, ...): an unknown option or
  an unwritable ``save_dir`` is an error when the logger is built, not a traceback from inside
  ``wandb.init`` in the middle of fitting.
- one W&B run per logger: several fits in one process (a pipeline of stages) each get their own run
  instead of silently appending to the first one.
- a summary that keeps what a reader compares runs by: the best ``val/acc`` (max) and the lowest
  ``val/loss`` and ``val/kd_loss`` (``summaries``), every metric against ``trainer/global_step``.
- in a log file (standard error not a terminal) W&B is ``quiet`` (no history sparklines and summary table
  when the run ends), and the run is finished before wandb's own exit hook, which would print its
  closing lines with ANSI colour codes into the file.
- logging trouble (a network error, a server refusing a key) is a loud warning, and the run goes on
  offline; it never stops training, so it never costs a checkpoint.

:class:`KDSaveConfigCallback` is the CLI's config saver: besides ``<save_dir>/config.yaml`` (overwritten
by the next run in the same directory, as before) it stores the full resolved config with the W&B run,
in the run's config under ``cli`` and as ``kd_config.yaml`` among the run's files, so every run keeps
its own copy.
"""

from __future__ import annotations

import atexit
import inspect
import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

MODES = ("auto", "online", "offline", "disabled")
# wandb.init arguments this logger sets itself; `init_kwargs` must not repeat them.
_OWN_INIT_KEYS = {"name", "project", "dir", "id", "resume", "anonymous", "group", "tags", "notes", "entity"}
_OWN_INIT_KEYS |= {"job_type", "mode"}
SETUP_HINT = (
    "W&B: no API key found, so this run logs offline to {dir}/wandb (nothing is uploaded). To switch W&B "
    "on: `wandb login` (or export WANDB_API_KEY=...), then rerun, or upload this run with "
    "`wandb sync {dir}/wandb/offline-run-*`. Set WANDB_MODE=offline to silence this line."
)
#: The default ``summaries``: a run's summary holds the best validation accuracy and losses, not the last.
SUMMARIES: dict[str, str] = {"val/acc": "max", "val/loss": "min", "val/kd_loss": "min"}
_SUMMARY_KINDS = ("min", "max", "mean", "first", "last", "best", "copy", "none")
#: The x-axis of every metric (Lightning's WandbLogger logs the Trainer's global step under this key).
STEP_KEY = "trainer/global_step"
# Runs this process created through a KDWandbLogger: a later logger may finish them (see `experiment`).
_OWNED_RUNS: set[str] = set()


def wandb_api_key_available() -> bool:
    """Whether W&B could authenticate without asking: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        # A netrc file we cannot read holds no key we could use; wandb itself would fail the same way.
        return False


def resolve_mode(mode: str) -> str | None:
    """The ``mode`` to give ``wandb.init``: ``None`` lets a set ``WANDB_MODE`` decide.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_api_key_available() else "offline"


def check_writable_dir(path: str | Path, argument: str = "save_dir") -> Path:
    """Check that ``path`` is, or can be created as, a directory this process can write to.

    Nothing is created: the nearest existing ancestor must be a writable directory.

    Raises:
        NotADirectoryError: ``path`` (or an ancestor) is a file.
        PermissionError: the directory (or the ancestor it would be created in) is not writable.
    """
    path = Path(path).expanduser()
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"`{argument}`: {str(path)!r} cannot be a log directory: {str(probe)!r} is a file."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == path.absolute() else f"would be created in {str(probe)!r}, which is"
        raise PermissionError(f"`{argument}`: the log directory {str(path)!r} {where} not writable.")
    return path


def _wandb_errors() -> tuple[type[Exception], ...]:
    import wandb

    # ConnectionError: the wandb-core service process is gone, e.g. SIGTERM'd with the rest of a SLURM
    # job step while this process is still saving its checkpoint ("Connection lost").
    return (wandb.errors.Error, ConnectionError)


class KDWandbLogger(WandbLogger):
    """Lightning's WandbLogger with an automatic online/offline mode and checked options.

    Args:
        save_dir: directory of the run (W&B writes ``<save_dir>/wandb/``; the CLI saves
            ``config.yaml`` here; dashboard pictures go under it). ``None``: the run directory when
            ``kd`` builds the logger (see :func:`kd_lightning.cli.place_run`), else ``runs``.
        name: the run's display name (``kd`` names an unnamed run ``[<job_type>-]<root name>-seed<seed>``).
        project: W&B project.
        group: W&B group (e.g. one per experiment, so teacher, student and distilled student sit together).
        tags: W&B tags.
        notes: a longer description of the run.
        entity: W&B user or team (default: the key's default entity).
        job_type: e.g. ``"teacher"``, ``"distill"``, ``"cache"``.
        mode: ``"auto"`` (``WANDB_MODE`` if set, else online with an API key, offline without one),
            ``"online"``, ``"offline"`` or ``"disabled"``.
        log_model: log ModelCheckpoint files as W&B artifacts (``True``: at the end, ``"all"``: as
            written); works offline too (uploaded by ``wandb sync``).
        id: resume the W&B run with this id.
        prefix: prefix of every metric key.
        summaries: what the run's summary keeps of a metric (``wandb.define_metric``'s ``summary``, e.g.
            ``"max"``, ``"min"``, ``"min,last"``); ``None``: :data:`SUMMARIES` (best ``val/acc``, lowest
            ``val/loss`` and ``val/kd_loss``). Every metric is plotted against :data:`STEP_KEY`.
        init_kwargs: further ``wandb.init`` arguments (checked against its signature).

    Raises:
        ValueError: an unknown ``mode``, an unknown or duplicated ``init_kwargs`` key, an unknown summary.
        PermissionError: ``save_dir`` is not writable.
        NotADirectoryError: ``save_dir`` is a file.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str | None = None,
        project: str = "kd-lightning",
        group: str | None = None,
        tags: Sequence[str] | None = None,
        notes: str | None = None,
        entity: str | None = None,
        job_type: str | None = None,
        mode: Literal["auto", "online", "offline", "disabled"] = "auto",
        log_model: bool | Literal["all"] = False,
        id: str | None = None,
        prefix: str = "",
        summaries: Mapping[str, str] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        init_kwargs = dict(init_kwargs or {})
        _check_init_kwargs(init_kwargs)
        self.summaries = _checked_summaries(SUMMARIES if summaries is None else summaries)
        # Absolute: wandb's service process, shared by every run of this process, resolves a relative
        # directory against its own working directory, not the one current at this run's start.
        save_dir = str(check_writable_dir("runs" if save_dir is None else save_dir, "save_dir").absolute())
        self.requested_mode = mode
        wandb_mode = resolve_mode(mode)
        extra = {"group": group, "tags": list(tags) if tags else None, "notes": notes, "entity": entity}
        extra["job_type"] = job_type
        if wandb_mode is not None:
            extra["mode"] = wandb_mode
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            id=id,
            log_model=log_model,
            prefix=prefix,
            **{k: v for k, v in extra.items() if v is not None},
            **init_kwargs,
        )
        # Lightning passes `anonymous=None`, which wandb >= 0.19 answers with a deprecation warning.
        self._wandb_init.pop("anonymous", None)
        if "settings" not in init_kwargs and not sys.stderr.isatty():
            import wandb

            # In a log file: no history sparklines and per-key summary table when the run ends (one line per
            # metric, hundreds with per-class keys), no links to docs; the run's place is still printed.
            self._wandb_init["settings"] = wandb.Settings(quiet=True)
        # The hint is printed when the run starts, where the user sees the rest of its output.
        self._hint = wandb_mode == "offline" and mode == "auto"

    def resume_run(self, run_id: str) -> None:
        """Continue the W&B run ``run_id`` instead of starting a new one (a resumed fit), online or offline.

        Offline, wandb writes a new ``offline-run-*`` directory with the same run id;
        ``wandb sync`` given both directories uploads them onto the one run, in order of start time.

        Raises:
            RuntimeError: this logger's run has already started.
        """
        if self._experiment is not None:
            raise RuntimeError(
                f"`resume_run({run_id!r})`: this logger's W&B run {self._experiment.id!r} has already started."
            )
        self._id = self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        import wandb

        stale = wandb.run
        if stale is not None and getattr(self, "_attach_id", None) is None and stale.id in _OWNED_RUNS:
            # Another KDWandbLogger of this process (an earlier pipeline stage) left its run open:
            # finish it, so that this logger's run is its own and not appended to the previous one.
            stale.finish()
        save_dir = Path(self._save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if getattr(self, "_attach_id", None) is not None:
            # A `ddp_spawn` worker attaches to the run its main process started; wandb builds the
            # attached run's settings from this process's defaults, so without this its media files
            # (logged images) would land in ./wandb instead of the run's directory.
            os.environ["WANDB_DIR"] = str(save_dir.absolute())
        try:
            run = super().experiment
        except _wandb_errors() as err:
            if self._wandb_init.get("mode") == "offline":
                raise
            # No network, a refused key, a server down: the run goes on offline rather than stopping.
            rank_zero_warn(
                f"W&B could not start an online run ({type(err).__name__}: {err}); logging offline to "
                f"{save_dir / 'wandb'} instead (upload later with `wandb sync`)."
            )
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            run = super().experiment
        if self._hint:
            rank_zero_info(SETUP_HINT.format(dir=save_dir))
            self._hint = False
        self._define_metrics(run)
        if run.id not in _OWNED_RUNS and getattr(self, "_attach_id", None) is None:
            # Finished by this handler, which runs before wandb's own exit hook (registered earlier): a run
            # finished by that hook prints its closing lines with ANSI colour codes even into a log file.
            atexit.register(run.finish)
        _OWNED_RUNS.add(run.id)
        return run

    def _define_metrics(self, run: Any) -> None:
        """The summary of each key of ``summaries``, plotted against :data:`STEP_KEY` as every metric
        (Lightning's WandbLogger defines that for ``"*"``; a key's own definition replaces the pattern's)."""
        join = f"{self._prefix}{self.LOGGER_JOIN_CHAR}" if self._prefix else ""
        try:
            for key, summary in self.summaries.items():
                run.define_metric(join + key, step_metric=STEP_KEY, summary=summary)
        except _wandb_errors() as err:
            _warn_logging_failed("the metric definitions", err)

    def __getstate__(self) -> dict[str, Any]:
        # As WandbLogger's (under `ddp_spawn` the main process creates the run and the rank-0 worker
        # attaches to it: one run), minus its `wandb.require("service")`, a no-op that warns in wandb >= 0.19.
        _ = self.experiment
        state = self.__dict__.copy()
        if self._experiment is not None:
            state["_id"] = getattr(self._experiment, "id", None)
            state["_attach_id"] = getattr(self._experiment, "_attach_id", None)
            state["_name"] = self._experiment.name
        state["_experiment"] = None
        return state

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except _wandb_errors() as err:
            _warn_logging_failed("metrics", err)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        try:
            super().log_hyperparams(params)
        except _wandb_errors() as err:
            _warn_logging_failed("hyperparameters", err)

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # The checkpoint is on disk already; uploading it is best effort.
        try:
            super().after_save_checkpoint(checkpoint_callback)
        except _wandb_errors() as err:
            _warn_logging_failed("the checkpoint artifact", err)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except _wandb_errors() as err:
            _warn_logging_failed("the checkpoint artifacts", err)


def _warn_logging_failed(what: str, err: Exception) -> None:
    rank_zero_warn(f"W&B: logging {what} failed ({type(err).__name__}: {err}); training goes on.")


def _checked_summaries(summaries: Mapping[str, str]) -> dict[str, str]:
    """``summaries`` as a dict, each value a comma-separated list of W&B summary kinds.

    Raises:
        ValueError: a value names no W&B summary kind (the message lists them).
    """
    for key, summary in summaries.items():
        unknown = [kind for kind in str(summary).split(",") if kind.strip() not in _SUMMARY_KINDS]
        if unknown:
            raise ValueError(
                f"`summaries[{key!r}]`: {summary!r} is not a W&B summary; give one or more of "
                f"{_SUMMARY_KINDS}, separated by commas."
            )
    return dict(summaries)


def _check_init_kwargs(init_kwargs: Mapping[str, Any]) -> None:
    import wandb

    known = set(inspect.signature(wandb.init).parameters) - {"kwargs"}
    unknown = sorted(set(init_kwargs) - known)
    if unknown:
        raise ValueError(
            f"`init_kwargs`: unknown wandb.init option(s) {unknown}; known: {sorted(known - _OWN_INIT_KEYS)}."
        )
    twice = sorted(set(init_kwargs) & _OWN_INIT_KEYS)
    if twice:
        raise ValueError(
            f"`init_kwargs`: {twice} are KDWandbLogger arguments of their own; give them directly, not in "
            "`init_kwargs`."
        )


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (any WandbLogger, this package's or Lightning's)."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def wandb_run(logger: Logger) -> Any | None:
    """The W&B run of ``logger`` on global rank 0, or ``None`` (no W&B logger, another rank, disabled)."""
    if not isinstance(logger, WandbLogger) or rank_zero_only.rank != 0:
        return None
    run = logger.experiment
    return None if getattr(run, "disabled", False) else run


class KDSaveConfigCallback(SaveConfigCallback):
    """The CLI's config saver: ``<log_dir>/config.yaml`` as Lightning writes it, and the full resolved
    config stored with each W&B run (run config key ``cli``, file ``kd_config.yaml``)."""

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in wandb_loggers(trainer):
            try:
                run = wandb_run(logger)
                if run is None:
                    continue
                import yaml

                run.config.update({"cli": yaml.safe_load(text)}, allow_val_change=True)
                # In the run's own directory: the next run in the same save_dir overwrites
                # config.yaml there, never this copy.
                Path(run.dir, "kd_config.yaml").write_text(text)
            except _wandb_errors() as err:
                _warn_logging_failed("the config", err)
