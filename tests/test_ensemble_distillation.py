"""The ensemble-distillation workflow on tiny data with a real Trainer: members, ensemble, choice on
validation, distilled students at two budgets, reuse; and the shipped configs parse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_run_dir import tiny_config

from kd_lightning.datamodules import IndexedDataModule, Synthetic
from kd_lightning.ensemble import disagreement
from kd_lightning.workflows.ensemble_distillation import distil_ensemble, distillation_candidates, share_kept

ROOT = Path(__file__).resolve().parents[1]


def student_config(path: Path, member: Path) -> Path:
    """The member's tiny config turned into a distillation from an ensemble through a soft-target store."""
    config = yaml.safe_load(member.read_text())
    config["trainer"]["callbacks"].append(
        {
            "class_path": "kd_lightning.callbacks.SoftTargetCache",
            "init_args": {
                "path": "runs/store",
                "kind": "logits",
                "dtype": "float16",
                "splits": ["train", "val", "test"],
            },
        }
    )
    config["model"] = {
        "class_path": "kd_lightning.modules.DistillationModule",
        "init_args": {
            "student": {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden": [8]}},
            "teacher": {
                "class_path": "kd_lightning.ensemble.Ensemble",
                "init_args": {"checkpoints": ["none"]},
            },
            "objective": {
                "class_path": "kd_lightning.objectives.HintonKD",
                "init_args": {"temperature": 4.0, "hard_weight": 0.5},
            },
        },
    }
    file = path / "student.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def test_distil_ensemble_two_budgets_choice_and_reuse(tmp_path):
    member = tiny_config(tmp_path)
    student = student_config(tmp_path, member)
    source = Synthetic(num_superclasses=2, classes_per_superclass=2, dim=8)

    def run():
        return distil_ensemble(
            member,
            student,
            IndexedDataModule(source, batch_size=16, val_size=32),
            member_seeds=[0, 1],
            student_seeds=[7, 8],
            epochs=[1, 2],
            candidates=distillation_candidates([2.0, 4.0], [0.5]),
            out="runs/ed",
            workdir=tmp_path,
        )

    result = run()
    assert result.chosen in {"T2_h0.5", "T4_h0.5"} and set(result.scores) == {"T2_h0.5", "T4_h0.5"}
    assert result.selection_epochs == 1 and result.selection_seed == 7
    assert [b.epochs for b in result.budgets] == [1, 2]
    for b in result.budgets:
        assert len(b.members) == 2 and len(b.distilled) == 2 and 0 <= b.disagreement <= 1
        assert math.isclose(b.ensemble_gain, b.ensemble["acc"] - sum(b.members) / 2)
        assert all(f"/e{b.epochs}/members/" in c for c in b.member_checkpoints)
    ed = tmp_path / "runs" / "ed"
    assert (ed / "e1" / "selection" / "selection.json").is_file()
    assert (ed / "e2" / "distilled" / "seed7" / "checkpoints" / "result.json").is_file()
    assert not (ed / "e2" / "selection").exists()  # the choice is made once, at the first budget
    assert (ed / "e1" / "distilled" / "seed8").is_dir() and not (ed / "e1" / "distilled" / "seed7").exists()
    again = run()  # every stage is reused: same numbers
    assert again.budgets[1].distilled == result.budgets[1].distilled


def test_errors_name_the_argument(tmp_path):
    dm = IndexedDataModule(Synthetic(), batch_size=16, val_size=32)
    with pytest.raises(ValueError, match="member_seeds"):
        distil_ensemble("m.yaml", "s.yaml", dm, member_seeds=[0])
    with pytest.raises(ValueError, match="epochs"):
        distil_ensemble("m.yaml", "s.yaml", dm, epochs=[0])
    with pytest.raises(ValueError, match="rule"):
        distil_ensemble("m.yaml", "s.yaml", dm, rule="vote")


def test_share_kept_and_disagreement():
    import torch

    assert math.isclose(share_kept(0.93, 0.92, 0.94), 0.5) and math.isnan(share_kept(0.9, 0.9, 0.9))
    same = torch.randn(1, 5, 3).repeat(3, 1, 1)
    assert disagreement(same) == 0.0
    with pytest.raises(ValueError, match="logits"):
        disagreement(same[:1])


@pytest.mark.parametrize(
    "config",
    [
        "cifar10/wrn_member.yaml",
        "cifar10/wrn_distill_ensemble.yaml",
        "fashion_mnist/cnn_member.yaml",
        "fashion_mnist/cnn_distill_ensemble.yaml",
    ],
)
def test_shipped_ensemble_configs_parse(config):
    """The configs parse against ``kd``'s parser (nothing built, no data read, no download)."""
    from kd_lightning.cli import parse_config

    parse_config(["--config", str(ROOT / "configs" / config)])


def test_kd_distil_ensemble_parses_its_arguments():
    """``kd ensemble-kd`` is built from the signature: every argument typed, data by class_path."""
    from kd_lightning.workflows import parser_for

    config = parser_for("ensemble-kd").parse_args(
        [
            "--member_config=m.yaml",
            "--student_config=s.yaml",
            "--data=kd_lightning.datamodules.IndexedDataModule",
            "--data.source=kd_lightning.datamodules.Synthetic",
            "--epochs=[8, 24]",
            "--candidates={T2: [--model.init_args.objective.init_args.temperature=2.0]}",
        ]
    )
    assert config.epochs == [8, 24] and config.candidates == {
        "T2": ["--model.init_args.objective.init_args.temperature=2.0"]
    }
