"""The generalist + specialists combination as a teacher (:class:`SpecialistTeacher`): its output is the
KL-combination function's, the temperature acts on it as on any logits, a store filled from it holds its
live outputs, a student distils from it through the soft-target cache, specialists run in worker
processes give the same outputs, and the distillation workflow's config parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_specialists import NET, trained  # noqa: F401  (`trained`: the fixture of a generalist and two specialists)
from trainers import quiet_trainer

from kd_lightning.cache import StoreIdentity, fill_store, split_dataset
from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.modules import DistillationModule, load_teacher
from kd_lightning.parallel import MemberPool
from kd_lightning.specialists import (
    SpecialistEnsemble,
    SpecialistTeacher,
    active_specialists,
    kl_combination,
    load_specialist,
)
from kd_lightning.store import Encoding, SoftTargetStore, teacher_fingerprint

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps


def make_teacher(d, **kwargs) -> SpecialistTeacher:
    return SpecialistTeacher(
        str(d["dir"] / "generalist.ckpt"), [str(p) for p in d["checkpoints"]], str(d["groups"]), **kwargs
    )


def test_forward_is_the_kl_combination_of_the_networks(trained):  # noqa: F811
    d = trained
    teacher = make_teacher(d)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    # The procedure restated from its parts: generalist, top-1 activation, each specialist on its rows.
    with torch.no_grad():
        generalist = load_teacher(d["dir"] / "generalist.ckpt")
        pg = generalist(x).float().softmax(-1)
        specialists = [load_specialist(p) for p in d["checkpoints"]]
        membership = torch.zeros(2, 6, dtype=torch.bool)
        for k, s in enumerate(specialists):
            membership[k, s.group_classes] = True
        active = active_specialists(pg, membership, 1)
        probs = []
        for k, s in enumerate(specialists):
            rows = active[:, k].nonzero().squeeze(1)
            p = torch.zeros(40, s.num_outputs)
            p[rows] = s(x[rows]).float().softmax(-1)
            probs.append(p)
        q = kl_combination(pg, probs, [s.classes for s in specialists], active).probs
        log_q = teacher(x)
    assert active.any(0).all(), "both specialists should be active somewhere for this test to mean anything"
    assert torch.equal(log_q, q.clamp_min(torch.finfo(torch.float32).tiny).log())
    # It is the evaluation module's prediction, and a frozen network.
    ensemble = SpecialistEnsemble(
        str(d["dir"] / "generalist.ckpt"), [str(p) for p in d["checkpoints"]], str(d["groups"])
    )
    with torch.no_grad():
        assert torch.equal(ensemble(x), log_q)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Temperature: softmax(log q / T) is q ** (1 / T) renormalised (fp32, 6 classes: a few roundings).
    for t in (0.5, 4.0):
        tempered = q.pow(1 / t)
        expected = tempered / tempered.sum(-1, keepdim=True)
        torch.testing.assert_close((log_q / t).softmax(-1), expected, rtol=16 * EPS32, atol=16 * EPS32)
    # The solver's settings are part of the teacher's identity (a store of other settings is stale).
    assert teacher_fingerprint(teacher) != teacher_fingerprint(make_teacher(d, tol=1e-3))
    assert teacher_fingerprint(teacher) == teacher_fingerprint(make_teacher(d))


def test_specialists_in_worker_processes_give_the_same_outputs(trained):  # noqa: F811
    teacher = make_teacher(trained)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    with MemberPool(list(teacher.specialists), workers=2, start_method="fork") as pool, torch.no_grad():
        parallel = teacher.run(x, pool)
        sequential = teacher.run(x)
    for a, b in zip(parallel.specialists, sequential.specialists, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(teacher.combine(parallel).probs, teacher.combine(sequential).probs)


def test_store_filled_from_the_teacher_holds_its_live_outputs(trained, tmp_path):  # noqa: F811
    d = trained
    teacher = make_teacher(d)
    data = d["data"]
    data.setup("fit")
    dataset = split_dataset(data, "train")
    identity = StoreIdentity.of(
        dataset, data.fingerprint("train"), num_classes=6, encoding=Encoding("logits", "float32")
    )
    batch = 16
    store = fill_store(teacher, dataset, tmp_path / "train", identity, batch_size=batch, progress=False)
    assert SoftTargetStore.open(tmp_path / "train").header["teacher"]["fingerprint"] == teacher_fingerprint(
        teacher
    )
    # Live, on the same batches (the solver stops when every row of a batch has converged, so a row's
    # output depends on its batch within `tol`; on the same batches it is the same computation).
    indices = torch.as_tensor(dataset.indices)
    with torch.no_grad():
        for start in range(0, len(indices), batch):
            index = indices[start : start + batch]
            x = torch.stack([dataset.input_of(int(i)) for i in index])
            assert torch.equal(store.lookup(index), teacher(x))


def test_student_distils_from_the_combination_through_the_cache(trained, tmp_path):  # noqa: F811
    d = trained
    student = DistillationModule(NET, 6, (8,), teacher=make_teacher(d))
    cache = SoftTargetCache(str(tmp_path / "store"), dtype="float32", splits=["train", "val"])
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[cache]
    )
    trainer.fit(student, d["data"])
    metrics = trainer.callback_metrics
    assert float(metrics["cache/hit_rate"]) == 1.0  # every soft target came from the store
    assert torch.isfinite(metrics["train/loss"]) and "val/teacher_acc" in metrics
    header = SoftTargetStore.open(tmp_path / "store" / "train").header
    assert header["teacher"]["architecture"] == "SpecialistTeacher"
    # The teacher is left out of the student's checkpoint; the student reloads without it.
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert load_teacher(tmp_path / "student.ckpt").teacher is None


def test_bad_inputs_name_the_argument(trained, tmp_path):  # noqa: F811
    d = trained
    with pytest.raises(ValueError, match="`specialist_ckpts` is empty"):
        SpecialistTeacher(str(d["dir"] / "generalist.ckpt"), [], str(d["groups"]))
    with pytest.raises(ValueError, match="predicts 6 classes, but num_classes=7"):
        make_teacher(d, num_classes=7)
    with pytest.raises(ValueError, match=r"`top_n` must be an integer in \[1, 6\]"):
        make_teacher(d, top_n=0)
    with pytest.raises(FileNotFoundError, match="`generalist_ckpt`"):
        SpecialistTeacher(str(tmp_path / "none.ckpt"), [str(p) for p in d["checkpoints"]], str(d["groups"]))


def test_shipped_distillation_config_parses():
    """configs/synthetic/distill_specialists.yaml against ``kd``'s parser (nothing built, no data read)."""
    from kd_lightning.cli import parse_config

    config = parse_config(["--config", str(ROOT / "configs" / "synthetic" / "distill_specialists.yaml")])
    teacher = config.model.init_args.teacher
    assert teacher.class_path == "kd_lightning.specialists.SpecialistTeacher"


# 30 classes (10 superclasses of 3), 40 training samples each, a few batches per epoch: the capacity
# study's tiny budget (tests/test_capacity_study.py), for the generalist, the specialists and the student.
TINY = [
    "--data.init_args.source.init_args.classes_per_superclass=3",
    "--data.init_args.source.init_args.train_per_class=40",
    "--data.init_args.source.init_args.test_per_class=10",
    "--data.init_args.val_size=300",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
]


@pytest.mark.slow
def test_distil_specialists_runs_the_shipped_configs_and_reuses_them(tmp_path):
    from kd_lightning.workflows import capacity_study as cs
    from kd_lightning.workflows.specialist_distillation import distil_specialists, format_distillation

    setting = {**cs.DEFAULT_SETTING, "epochs": 1, "overlap_threshold": 0.5}
    candidates = {"T1": ["--model.init_args.objective.init_args.temperature=1.0"]}
    result = distil_specialists([1], tmp_path, setting=setting, candidates=candidates, overrides=TINY)
    assert result.chosen == "T1" and set(result.scores) == {"T1"}
    (r,) = result.seeds
    assert r.seed == 1 and 0 <= r.student <= 1 and r.gain == r.combination - r.generalist
    assert r.teacher_arguments[0].endswith("seed1/checkpoints/final.ckpt")
    seed1 = tmp_path / "seed1"
    # The first seed's student is the chosen candidate's run; the store was filled from the combination.
    assert (seed1 / "distilled_selection" / "selection.json").is_file()
    assert "distilled_selection/T1" in r.student_checkpoint
    header = SoftTargetStore.open(seed1 / "runs" / "synthetic" / "specialists_soft_targets" / "train").header
    assert header["teacher"]["architecture"] == "SpecialistTeacher"
    text = format_distillation(result)
    assert "| mean ± std |" in text and "share kept of the means" in text
    # Without candidates, the config's setting: the generalist and specialists are reused, the store too.
    plain = distil_specialists([1], tmp_path, setting=setting, candidates={}, overrides=TINY)
    assert plain.chosen == "config" and plain.seeds[0].generalist == r.generalist
    assert plain.seeds[0].student_checkpoint.startswith(
        str(seed1 / "runs" / "synthetic" / "distill_specialists")
    )


def test_kd_specialists_kd_parses_its_arguments():
    from kd_lightning.workflows import parser_for

    config = parser_for("specialists-kd").parse_args(["--seeds=[1, 2]", "--jobs=2", "--candidates={}"])
    assert config.seeds == [1, 2] and config.jobs == 2 and config.candidates == {}
