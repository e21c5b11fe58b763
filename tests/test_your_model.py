"""Acceptance (issue 17): from the shipped YAML only, a torchvision teacher fine-tuned on a generated image
folder, then distilled into another torchvision student through the soft-target cache (random crops
replayed per image and view), and the CSV metrics read back."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from tiny_images import SMALL_IMAGES

from kd_lightning.cli import console, main
from kd_lightning.modules import load_teacher
from kd_lightning.store import SoftTargetStore

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "imagefolder"
CLASSES = ("circle", "square", "stripe")

QUICK = [
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=cpu",
    "--trainer.log_every_n_steps=1",
]


def write_pictures(root: Path, per_class: dict[str, int]) -> None:
    """PNG pictures, 36x32 to 44x32 pixels, one colour channel per class plus noise."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (32, 36 + 4 * (i % 3), 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def read_csv(run_dir: Path) -> list[dict[str, str]]:
    (metrics,) = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    with metrics.open() as f:
        return list(csv.DictReader(f))


def test_finetune_then_distil_torchvision_networks_on_an_image_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pictures(tmp_path / "data/my_images", {"train": 6, "val": 2})  # no test/: tests on val/
    (tmp_path / "small.yaml").write_text(SMALL_IMAGES)
    # In YAML: jsonargparse 4.53 reads `--model.init_args.student.init_args.weights=null` as the string 'None'.
    (tmp_path / "scratch.yaml").write_text("model: {init_args: {student: {init_args: {weights: null}}}}\n")
    # "Pretrained" teacher weights: an ImageNet-shaped state dict saved locally (no network in tests).
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18_imagenet.pt")

    console(
        [
            "fit",
            "--config",
            str(CONFIGS / "teacher_finetune.yaml"),
            "--config",
            "small.yaml",
            "--model.init_args.net.init_args.name=resnet18",  # resnet50 as shipped: the same, slower
            f"--model.init_args.net.init_args.weights={tmp_path / 'resnet18_imagenet.pt'}",
            *QUICK,
        ]
    )
    teacher_dir = tmp_path / "runs/imagefolder/teacher/seed0"
    assert (teacher_dir / "checkpoints/final.ckpt").is_file()
    rows = read_csv(teacher_dir)
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")] and any(r.get("train/loss") for r in rows)

    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "distill_cached.yaml"),
            "--config",
            "small.yaml",
            "--config",
            "scratch.yaml",  # weights: DEFAULT as shipped is a download
            *QUICK,
        ]
    )
    student_dir = tmp_path / "runs/imagefolder/distill/seed0"
    rows = read_csv(student_dir)
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 2 and all(0.0 <= a <= 1.0 for a in val_acc)
    assert [float(r["cache/hit_rate"]) for r in rows if r.get("cache/hit_rate")] == [1.0, 1.0]
    assert any(r.get("train/soft") for r in rows) and any(r.get("val/agreement") for r in rows)
    assert type(cli.model.net.model).__name__ == "MobileNetV3" and cli.model.teacher is None

    # The store holds the teacher's outputs for the replayed random crops the student was shown.
    store = SoftTargetStore.open(tmp_path / "runs/imagefolder/soft_targets/train")
    assert store.num_views == 4
    teacher = load_teacher(teacher_dir / "checkpoints/final.ckpt")
    train = cli.datamodule.train_set
    for index, view in ((0, 0), (5, 3), (17, 1)):
        with torch.no_grad():
            expected = teacher(train.input_of(index, view)[None])
        torch.testing.assert_close(store.lookup([index], [view]), expected, atol=2e-2, rtol=1e-2)
    assert not torch.equal(train.input_of(5, 0), train.input_of(5, 3))


def test_a_misshaped_folder_stops_the_run_before_any_logger_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/my_images/train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data/my_images/train/loose.png")  # no class folders
    args = ["fit", "--config", str(CONFIGS / "teacher_finetune.yaml"), *QUICK]
    # jsonargparse re-raises errors of construction as ValueError with the original message inside.
    with pytest.raises((FileNotFoundError, ValueError), match="no class folders in"):
        main(args)
    assert not (tmp_path / "runs").exists()  # no W&B run, CSV file or checkpoint directory
