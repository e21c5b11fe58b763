"""Data sources and the batch contract, on tiny fake files written in the real on-disk formats.

Nothing here downloads: every source is pointed at files made in ``tmp_path`` (or generated), and
``download`` stays ``False``.
"""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lightning.datamodules import (
    CIFAR10,
    CIFAR100,
    MNIST,
    MNIST1D,
    ClassificationSource,
    Digits,
    FashionMNIST,
    ImageFolder,
    IndexedDataModule,
    Synthetic,
    read_idx,
)

# ---------------------------------------------------------------------------------------------
# Writers for the real formats


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C}
    codes |= {np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(raw)
    return path


def write_mnist_files(d: Path, n_train: int = 40, n_test: int = 12, gz: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return d


def _pickle(path: Path, obj: dict, str_keys: bool) -> None:
    # The official files are Python 2 pickles whose keys load as str; Python 3 writers give b"..." keys.
    obj = {(k.decode() if str_keys else k): v for k, v in obj.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(
    root: Path, per_batch: int = 4, n_test: int = 6, str_keys: bool = False, meta: bool = True
) -> Path:
    d = root / "cifar-10-batches-py"
    rng = np.random.default_rng(1)
    for i, n in [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        _pickle(
            d / i,
            {b"batch_label": i.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n},
            str_keys,
        )
    if meta:
        names = [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ]
        _pickle(
            d / "batches.meta",
            {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
            str_keys,
        )
    return root


def write_cifar100(root: Path, n_train: int = 15, n_test: int = 5) -> Path:
    d = root / "cifar-100-python"
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine}
        batch |= {
            b"coarse_labels": [f // 5 for f in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        _pickle(d / name, batch, str_keys=False)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
    _pickle(
        d / "meta", meta | {b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, str_keys=False
    )
    return root


def write_image_folder(
    root: Path, train: dict[str, int], val: dict[str, int], size=(12, 10), test: dict[str, int] | None = None
) -> Path:
    """PNG files of random colours: ``{class: count}`` per split, varying sizes to exercise the resize."""
    rng = np.random.default_rng(3)
    for split, counts in (("train", train), ("val", val), ("test", test or {})):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size[0] + i % 3, size[1]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    return root


# ---------------------------------------------------------------------------------------------
# The batch contract, checked for any source


def collect(loader) -> dict[int, torch.Tensor]:
    """index -> input over one pass of a loader, checking each batch's keys and types."""
    seen: dict[int, torch.Tensor] = {}
    for batch in loader:
        assert set(batch) == {"input", "target", "index"}
        assert batch["input"].dtype == torch.float32
        assert batch["target"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        for j, x in zip(batch["index"].tolist(), batch["input"], strict=True):
            assert j not in seen, f"index {j} served twice in one epoch"
            seen[j] = x
    return seen


def check_contract(
    source: ClassificationSource, val_size: int | float, workers: bool = False
) -> IndexedDataModule:
    """Items follow the contract, and ``index`` is the position in the source split for any loader."""
    dm = IndexedDataModule(source, batch_size=3, eval_batch_size=5, val_size=val_size, split_seed=7)
    dm.setup()
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        ref_data, ref_targets = source.load(train=split != "test")
        assert (
            ref_targets.dtype == torch.int64 and ref_targets.ndim == 1 and len(ref_data) == len(ref_targets)
        )
        item = dataset[0]
        assert set(item) == {"input", "target", "index"}
        assert isinstance(item["target"], int) and isinstance(item["index"], int)
        assert isinstance(item["input"], torch.Tensor) and item["input"].dtype == torch.float32
        assert tuple(item["input"].shape) == dm.input_shape == tuple(source.input_shape)
        for i in (0, len(dataset) - 1):
            j = dataset[i]["index"]
            assert j == int(dataset.indices[i])
            assert torch.equal(dataset[i]["input"], ref_data[j][0])
            assert dataset[i]["target"] == int(ref_targets[j]) == int(dataset.targets[i])
        assert int(ref_targets.min()) >= 0 and int(ref_targets.max()) < source.num_classes
    assert len(source.class_names) == source.num_classes == dm.num_classes

    ref_train, _ = source.load(train=True)
    torch.manual_seed(0)
    first = collect(dm.train_dataloader())
    second = collect(dm.train_dataloader())  # another shuffle
    assert sorted(first) == dm.train_set.indices.tolist()
    for j, x in first.items():
        assert torch.equal(x, ref_train[j][0]) and torch.equal(second[j], x)
    if workers:
        dm2 = IndexedDataModule(
            source, batch_size=3, eval_batch_size=5, val_size=val_size, split_seed=7, num_workers=2
        )
        dm2.setup()
        for loader, ref in (
            (dm2.train_dataloader(), first),
            (dm2.val_dataloader(), collect(dm.val_dataloader())),
        ):
            got = collect(loader)
            assert sorted(got) == sorted(ref)
            assert all(torch.equal(got[j], ref[j]) for j in ref)
        ref_test, _ = source.load(train=False)
        got = collect(dm2.test_dataloader())
        assert sorted(got) == list(range(len(ref_test)))
        assert all(torch.equal(x, ref_test[j][0]) for j, x in got.items())
    return dm


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i2", "i4", "f4", "f8"])
def test_read_idx_round_trip(tmp_path, suffix, dtype):
    a = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != "u1"
        else np.arange(24, dtype="u1").reshape(2, 3, 4)
    )
    back = read_idx(write_idx(tmp_path / f"a{suffix}", a))
    assert back.shape == a.shape and back.dtype == a.dtype and np.array_equal(back, a)


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 2), dtype=np.uint8)).read_bytes()
    (tmp_path / "magic").write_bytes(b"\x1f\x8b" + good[2:])  # e.g. a .gz misnamed as raw
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "short")
    # Through a source: a corrupt labels file fails loudly instead of loading garbage.
    d = write_mnist_files(tmp_path / "fm", gz=False)
    (d / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x07\x01" + b"\x00" * 8)
    with pytest.raises(ValueError):
        FashionMNIST(data_dir=str(d)).load(train=True)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_contract(tmp_path, gz):
    source = FashionMNIST(data_dir=str(write_mnist_files(tmp_path, gz=gz)))
    dm = check_contract(source, val_size=10, workers=gz)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 12)


def test_idx_source_torchvision_layout_and_normalisation(tmp_path):
    d = write_mnist_files(tmp_path / "MNIST" / "raw", gz=False)
    data, targets = MNIST(data_dir=str(tmp_path)).load(train=False)
    raw = read_idx(d / "t10k-images-idx3-ubyte")
    expected = (torch.from_numpy(raw).float() / 255 - MNIST.mean) / MNIST.std
    assert torch.allclose(data.tensors[0][:, 0], expected)
    assert targets.tolist() == [i % 10 for i in range(12)]


def test_split_is_disjoint_covering_and_deterministic(tmp_path):
    source = FashionMNIST(data_dir=str(write_mnist_files(tmp_path, n_train=50)))

    def split(seed, val_size=0.2):
        dm = IndexedDataModule(source, val_size=val_size, split_seed=seed)
        dm.setup("fit")
        assert dm.test_set is None  # fit does not read the test file
        return dm.train_set.indices.tolist(), dm.val_set.indices.tolist()

    train, val = split(0)
    assert len(val) == 10 and not set(train) & set(val)
    assert sorted(train + val) == list(range(50))
    assert split(0) == (train, val)
    assert split(1) != (train, val)
    assert len(split(0, val_size=7)[1]) == 7
    with pytest.raises(ValueError, match="val_size"):
        split(0, val_size=50)

    dm = IndexedDataModule(source, val_size=10, split_seed=0, train_fraction=0.5)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and set(dm.train_set.indices.tolist()) <= set(train)
    assert dm.val_set.indices.tolist() == val  # the subset never touches validation


@pytest.mark.parametrize("cls", [FashionMNIST, MNIST, CIFAR10, CIFAR100])
def test_missing_files_name_data_dir(tmp_path, cls):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    source = cls(data_dir=str(empty), download=False)
    with pytest.raises(FileNotFoundError, match="nothing-here") as err:
        source.prepare()
    assert "download" in str(err.value)
    dm = IndexedDataModule(source, val_size=1)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        dm.setup()


# ---------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_contract_and_meta(tmp_path, str_keys):
    source = CIFAR10(data_dir=str(write_cifar10(tmp_path, str_keys=str_keys)))
    dm = check_contract(source, val_size=5, workers=not str_keys)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    assert source.class_names[:3] == ["airplane", "automobile", "bird"] and len(source.class_names) == 10
    assert CIFAR10(data_dir=str(tmp_path / "cifar-10-batches-py")).load(train=False)[1].tolist() == (
        source.load(train=False)[1].tolist()
    )  # data_dir may also be the extracted folder itself


def test_cifar10_channel_layout_and_normalisation(tmp_path):
    write_cifar10(tmp_path, meta=False)
    # One image whose rows are [1024 red | 1024 green | 1024 blue]: red 255, green 0, blue ramps.
    row = np.concatenate([np.full(1024, 255), np.zeros(1024), np.arange(1024) % 256]).astype(np.uint8)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _pickle(
        path, {b"data": row[None], b"labels": [3], b"batch_label": b"t", b"filenames": [b"a"]}, str_keys=False
    )
    source = CIFAR10(data_dir=str(tmp_path))
    data, targets = source.load(train=False)
    x = data.tensors[0][0] * torch.tensor(CIFAR10.std).view(3, 1, 1) + torch.tensor(CIFAR10.mean).view(
        3, 1, 1
    )
    # /255, -mean, /std there and *std, +mean here: a few (8) fp32 roundings of values of size <= 1.
    tol = 8 * torch.finfo(torch.float32).eps
    assert torch.allclose(x[0], torch.ones(32, 32), rtol=0, atol=tol)
    assert torch.allclose(x[1], torch.zeros(32, 32), rtol=0, atol=tol)
    assert torch.allclose(x[2, 0, :5] * 255, torch.arange(5.0), rtol=0, atol=255 * tol)  # row-major H x W
    assert targets.tolist() == [3]
    assert source.class_names == [str(i) for i in range(10)]  # no meta file


def test_cifar100_contract(tmp_path):
    source = CIFAR100(data_dir=str(write_cifar100(tmp_path)))
    dm = check_contract(source, val_size=0.2)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 3, 5)
    assert source.num_classes == 100 and source.class_names[7] == "fine7"


# ---------------------------------------------------------------------------------------------
# ImageFolder


def test_image_folder_splits_are_the_folders_their_names_say(tmp_path):
    root = write_image_folder(
        tmp_path / "imgs", {"cat": 4, "dog": 3, "eel": 5}, {"cat": 2, "dog": 2, "eel": 1}
    )
    source = ImageFolder(str(root), image_size=8)
    assert source.resize == 9 and source.input_shape == (3, 8, 8)
    assert source.class_names == ["cat", "dog", "eel"] and source.num_classes == 3
    dm = IndexedDataModule(source, batch_size=3, eval_batch_size=5)
    dm.setup()
    # train/ is the training split, val/ the validation split; without test/ the test split is val/.
    assert len(dm.train_set) == 12 and len(dm.val_set) == 5 and len(dm.test_set) == 5
    assert dm.train_set.targets.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert dm.val_set.targets.tolist() == dm.test_set.targets.tolist() == [0, 0, 1, 1, 2]
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        item = dataset[len(dataset) - 1]
        assert item["input"].shape == (3, 8, 8) and item["input"].dtype == torch.float32
        assert type(item["input"]) is torch.Tensor and item["index"] == len(dataset) - 1
    assert sorted(collect(dm.train_dataloader())) == list(range(12))
    # A test/ folder is the test split.
    write_image_folder(root, {}, {}, test={"cat": 1, "eel": 2})
    dm = IndexedDataModule(ImageFolder(str(root), image_size=8), eval_batch_size=5)
    dm.setup()
    assert len(dm.val_set) == 5 and dm.test_set.targets.tolist() == [0, 2, 2]


def test_image_folder_without_val_carves_validation_and_tests_on_it(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"cat": 10, "dog": 10}, {})
    dm = IndexedDataModule(ImageFolder(str(root), image_size=8))  # val_size: 0.1 of train/ by default
    dm.setup("test")
    assert len(dm.train_set) == 18 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    dm = IndexedDataModule(ImageFolder(str(root), image_size=8), val_size=0.25)
    dm.setup("fit")
    assert len(dm.val_set) == 5
    with pytest.raises(ValueError, match="`val_size` must be a count"):
        IndexedDataModule(ImageFolder(str(root), image_size=8), val_size=1.5)


def test_image_folder_errors_at_construction(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"cat": 1, "dog": 1}, {"cat": 1, "emu": 1})
    with pytest.raises(ValueError, match="has class folders that 'train' lacks: \\['emu'\\]"):
        ImageFolder(str(root), image_size=8)
    ImageFolder(str(root), image_size=8, val_dir="no-such-folder")  # an absent val/ is not an error
    with pytest.raises(FileNotFoundError, match="no-such-root"):
        ImageFolder(str(tmp_path / "no-such-root"))
    (tmp_path / "flat/train").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "flat/train/a.png")
    with pytest.raises(FileNotFoundError, match="no class folders in"):
        ImageFolder(str(tmp_path / "flat"))  # images straight in train/, no class folders
    (tmp_path / "flat/train/cat").mkdir()
    (tmp_path / "flat/train/cat/notes.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match=r"class folders without images .*\['cat'\]"):
        ImageFolder(str(tmp_path / "flat"))
    with pytest.raises(ValueError, match="resize"):
        ImageFolder(str(root), image_size=32, resize=16)


def _crops(size: int):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.3, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )


def test_torchvision_pipelines_crop_the_pictures_and_replay(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, {"cat": 1, "dog": 1}, size=(40, 30))
    source = ImageFolder(str(root), image_size=16)
    dm = IndexedDataModule(source, batch_size=2, train_transform=_crops(16), augment_seed=5, augment_views=3)
    dm.setup("fit")
    train = dm.train_set
    first = train.input_of(4, view=1)
    assert first.shape == (3, 16, 16) and torch.equal(first, train.input_of(4, view=1))
    assert not torch.equal(first, train.input_of(4, view=2))
    assert torch.equal(train[4]["input"], train.input_of(4, view=0))  # epoch 0 serves view 0
    # The un-augmented input (fixed mode, validation) is the source's resize + centre crop.
    picture, _ = train.source[4]
    assert torch.equal(train.input_of(4), source.preprocess(picture).as_subclass(torch.Tensor))
    # The global generator is left as it was; views are replayed in DataLoader workers too.
    state = torch.get_rng_state()
    train.input_of(3, view=2)
    assert torch.equal(torch.get_rng_state(), state)
    workers = IndexedDataModule(
        source, batch_size=2, train_transform=_crops(16), augment_seed=5, augment_views=3, num_workers=2
    )
    workers.setup("fit")
    got = collect_views(workers.train_dataloader())
    assert sorted(got) == list(range(6)) and all(
        torch.equal(x, train.input_of(j, view=0)) for j, x in got.items()
    )
    # A pipeline whose output is not the data's input_shape is refused at setup, naming it.
    wrong = IndexedDataModule(source, train_transform=_crops(12))
    with pytest.raises(ValueError, match="`train_transform` makes inputs of shape \\(3, 12, 12\\)"):
        wrong.setup("fit")


def collect_views(loader) -> dict[int, torch.Tensor]:
    return {j: x for batch in loader for j, x in zip(batch["index"].tolist(), batch["input"], strict=True)}


def test_torchvision_pipelines_parse_through_kd(tmp_path, monkeypatch):
    """`train_transform` and `eval_transform` take `class_path: torchvision.transforms.v2.Compose` in YAML."""
    from torchvision.transforms import v2

    from kd_lightning.cli import parse_config

    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1})
    config = tmp_path / "data.yaml"
    config.write_text(
        f"""
data:
  class_path: kd_lightning.datamodules.IndexedDataModule
  init_args:
    source:
      class_path: kd_lightning.datamodules.ImageFolder
      init_args: {{root: {root}, image_size: 16}}
    train_transform:
      class_path: torchvision.transforms.v2.Compose
      init_args:
        transforms:
          - class_path: torchvision.transforms.v2.RandomResizedCrop
            init_args: {{size: 16}}
          - class_path: torchvision.transforms.v2.RandomHorizontalFlip
          - class_path: torchvision.transforms.v2.ToImage
          - class_path: torchvision.transforms.v2.ToDtype
            init_args: {{dtype: torch.float32, scale: true}}
          - class_path: torchvision.transforms.v2.Normalize
            init_args: {{mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}}
    eval_transform:
      class_path: torchvision.transforms.v2.Compose
      init_args:
        transforms:
          - class_path: torchvision.transforms.v2.Resize
            init_args: {{size: [16, 16]}}
          - class_path: torchvision.transforms.v2.ToImage
          - class_path: torchvision.transforms.v2.ToDtype
            init_args: {{dtype: torch.float32, scale: true}}
"""
    )
    args = ["--config", str(config), "--model=kd_lightning.modules.ClassifierModule"]
    args += ["--model.init_args.net=kd_lightning.models.MLP"]
    parsed = parse_config(args)
    steps = parsed.data.init_args.train_transform.init_args.transforms
    assert [s.class_path.rsplit(".", 1)[1] for s in steps][:2] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
    ]
    from kd_lightning.cli import main

    cli = main(["--config", str(config), *args[2:], "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    assert isinstance(dm.eval_transform, v2.Compose)
    dm.setup("fit")
    assert dm.val_set[0]["input"].shape == (3, 16, 16) and dm.train_set[0]["input"].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Generated and bundled data


def _arrays(source: ClassificationSource, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    data, targets = source.load(train=train)
    x, y = data.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.equal(y, targets)
    assert tuple(x.shape[1:]) == tuple(source.input_shape)
    return x, y


def test_digits():
    train, test = _arrays(Digits(), True), _arrays(Digits(), False)
    assert len(train[0]) + len(test[0]) == 1797 and len(test[0]) == 360
    assert torch.bincount(test[1], minlength=10).min() >= 34  # stratified
    x = torch.cat([train[0], test[0]])
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    again = _arrays(Digits(), False)
    assert torch.equal(again[0], test[0]) and torch.equal(again[1], test[1])
    assert not torch.equal(_arrays(Digits(seed=1), False)[1], test[1])
    check_contract(Digits(), val_size=100)


def test_mnist1d_is_generated_deterministically_without_touching_global_rngs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show up here
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    source = MNIST1D(num_samples=200, seed=3)
    x, y = _arrays(source, True)
    xt, yt = _arrays(source, False)
    assert x.shape == (160, 1, 40) and xt.shape == (40, 1, 40) and source.input_shape == (1, 40)
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert list(tmp_path.iterdir()) == []
    x2, _ = _arrays(MNIST1D(num_samples=200, seed=3), True)
    assert torch.equal(x, x2)
    assert not torch.equal(x, _arrays(MNIST1D(num_samples=200, seed=4), True)[0])
    check_contract(source, val_size=20)


def test_synthetic_shapes_and_determinism():
    s = Synthetic(
        num_superclasses=3, classes_per_superclass=2, dim=5, train_per_class=7, test_per_class=2, seed=1
    )
    x, y = _arrays(s, True)
    assert x.shape == (42, 5) and s.num_classes == 6 and s.input_shape == (5,)
    assert torch.bincount(y).tolist() == [7] * 6 and len(_arrays(s, False)[0]) == 12
    assert s.superclass_of == [0, 0, 1, 1, 2, 2] and len(s.class_names) == 6
    same = Synthetic(
        num_superclasses=3, classes_per_superclass=2, dim=5, train_per_class=7, test_per_class=2, seed=1
    )
    assert torch.equal(_arrays(same, False)[0], _arrays(s, False)[0])  # test first, then train: same data
    assert torch.equal(_arrays(same, True)[0], x)
    other = Synthetic(
        num_superclasses=3, classes_per_superclass=2, dim=5, train_per_class=7, test_per_class=2, seed=2
    )
    assert not torch.equal(_arrays(other, True)[0], x)
    check_contract(s, val_size=6)


def test_synthetic_confusions_stay_within_superclasses():
    s = Synthetic()
    assert s.num_classes == 50 and s.input_shape == (32,) and len(s.superclass_of) == 50
    x, y = _arrays(s, True)
    xt, yt = _arrays(s, False)
    means = torch.stack([x[y == c].mean(0) for c in range(s.num_classes)])
    pred = torch.cdist(xt, means).argmin(1)
    group = torch.tensor(s.superclass_of)
    wrong = pred != yt
    accuracy = 1 - wrong.float().mean().item()
    within = (group[pred] == group[yt]) & wrong
    assert 0.4 < accuracy < 0.95, accuracy  # learnable, but not solved
    assert within.sum() >= 0.9 * wrong.sum(), (int(within.sum()), int(wrong.sum()))
    assert (group[pred] == group[yt]).float().mean() > 0.97


# ---------------------------------------------------------------------------------------------
# The Debian package


FASHION_DIR = Path(FashionMNIST.system_dir)


@pytest.mark.skipif(
    not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
    and not (FASHION_DIR / "t10k-labels-idx1-ubyte").is_file(),
    reason=f"Debian's Fashion-MNIST is not installed at {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_finds_debian_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./data to find instead
    source = FashionMNIST()
    source.prepare()
    train_images, train_labels = source._find(True)
    assert train_images.parent == FASHION_DIR
    assert np.bincount(read_idx(train_labels)).tolist() == [6000] * 10
    data, targets = source.load(train=False)
    assert data.tensors[0].shape == (10000, 1, 28, 28) and torch.bincount(targets).tolist() == [1000] * 10
    assert abs(float(data.tensors[0].mean())) < 0.05  # roughly standardised with the train statistics
