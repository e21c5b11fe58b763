"""The data-loading policy (kd_lightning.datamodules.loading): workers that follow the CPUs given, pinned
memory, persistent workers and prefetching on a GPU, explicit settings kept; no GPU needed."""

from __future__ import annotations

import pytest
from lightning.pytorch.accelerators import CPUAccelerator
from trainers import quiet_trainer

from kd_lightning.datamodules import IndexedDataModule, Synthetic, base, loading
from kd_lightning.datamodules.loading import (
    GPU_PREFETCH,
    MAX_AUTO_WORKERS,
    LoaderSettings,
    cpus_given,
    loader_options,
    processes_sharing_cpus,
)
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule


@pytest.fixture
def eight_cpus(monkeypatch):
    """This process is bound to CPUs 0..7, outside SLURM."""
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)


def test_cpu_loads_in_the_training_process():
    assert loader_options(gpu=False, cpus=64) == LoaderSettings(0, False, False, None)


def test_gpu_workers_follow_the_cpus_per_process():
    assert loader_options(gpu=True, cpus=8) == LoaderSettings(7, True, True, GPU_PREFETCH)
    assert loader_options(gpu=True, cpus=8, processes=4).num_workers == 1
    # One CPU per process: it loads itself, and the worker settings have nothing to apply to.
    assert loader_options(gpu=True, cpus=4, processes=4) == LoaderSettings(0, True, False, None)
    assert loader_options(gpu=True, cpus=256).num_workers == MAX_AUTO_WORKERS


def test_explicit_settings_win():
    options = loader_options(num_workers=2, pin_memory=False, persistent_workers=False, gpu=True, cpus=32)
    assert options == LoaderSettings(2, False, False, GPU_PREFETCH)
    assert loader_options(num_workers=0, gpu=True, cpus=32) == LoaderSettings(0, True, False, None)
    assert loader_options(num_workers=3, prefetch_factor=8, pin_memory=True, gpu=False, cpus=1) == (
        LoaderSettings(3, True, True, 8)
    )
    # Asked for with automatic workers that a CPU makes 0: dropped, not an error.
    assert loader_options(persistent_workers=True, prefetch_factor=3, gpu=False, cpus=8).num_workers == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_workers=-1), "`num_workers` must be an integer >= 0 or None"),
        (dict(num_workers=1.5), "`num_workers` must be an integer >= 0 or None"),
        (dict(prefetch_factor=0, num_workers=2), "`prefetch_factor` must be an integer >= 1"),
        (dict(num_workers=0, persistent_workers=True), "`num_workers` is 0"),
        (dict(num_workers=0, prefetch_factor=2), "`num_workers` is 0"),
        (dict(cpus=0), "`cpus` must be a positive integer, got 0"),
        (dict(processes=0), "`processes` must be a positive integer, got 0"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loader_options(**{"gpu": True, "cpus": 8, **kwargs})


def test_cpus_given_reads_the_affinity_and_slurm(eight_cpus, monkeypatch):
    assert cpus_given() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cpus_given() == 3
    assert cpus_given({"SLURM_CPUS_PER_TASK": "32"}) == 8  # the affinity binds tighter
    with pytest.raises(ValueError, match="`SLURM_CPUS_PER_TASK` must be a positive integer, got 'x'"):
        cpus_given({"SLURM_CPUS_PER_TASK": "x"})


def test_slurm_tasks_have_their_own_cpus():
    assert processes_sharing_cpus(4, {}) == 4
    assert processes_sharing_cpus(4, {"SLURM_CPUS_PER_TASK": "8"}) == 1


def _datamodule(**kwargs) -> IndexedDataModule:
    source = Synthetic(
        num_superclasses=2, classes_per_superclass=2, dim=4, train_per_class=8, test_per_class=2
    )
    return IndexedDataModule(source, batch_size=4, eval_batch_size=8, val_size=3, **kwargs)


def test_datamodule_on_cpu_keeps_the_cheap_default(tmp_path, eight_cpus):
    dm = _datamodule()
    assert (dm.num_workers, dm.pin_memory) == (0, False)  # no Trainer: a CPU
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(ClassifierModule(MLP, 4, (4,)), datamodule=dm)
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (0, False, False)


@pytest.fixture
def cpu_counts_as_gpu(monkeypatch):
    """The DataModule takes this CPU Trainer's accelerator for CUDA (the flag it reads), on 8 CPUs."""
    monkeypatch.setattr(base, "CUDAAccelerator", CPUAccelerator)
    monkeypatch.setattr(base, "cpus_given", lambda: 8)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)


@pytest.mark.parametrize(("devices", "workers"), [(1, 7), (2, 3)])
def test_datamodule_on_a_gpu_trainer_follows_the_policy(tmp_path, cpu_counts_as_gpu, devices, workers):
    dm = _datamodule()
    dm.trainer = quiet_trainer(tmp_path, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto")
    assert dm.loader_settings == LoaderSettings(workers, True, True, GPU_PREFETCH)
    assert (dm.num_workers, dm.pin_memory) == (workers, True)  # what the soft-target cache builds with
    dm.setup("fit")
    loader = dm.val_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (workers, True, True)
    assert loader.prefetch_factor == GPU_PREFETCH


def test_datamodule_explicit_settings_win_on_a_gpu(tmp_path, cpu_counts_as_gpu):
    dm = _datamodule(num_workers=1, pin_memory=False, persistent_workers=False, prefetch_factor=2)
    dm.trainer = quiet_trainer(tmp_path)
    assert dm.loader_settings == LoaderSettings(1, False, False, 2)
    in_process = _datamodule(num_workers=0)
    in_process.trainer = dm.trainer
    assert in_process.loader_settings == LoaderSettings(0, True, False, None)


def test_datamodule_rejects_worker_settings_without_workers():
    with pytest.raises(ValueError, match="`num_workers` is 0"):
        _datamodule(num_workers=0, persistent_workers=True)
