"""Confusion clustering: matrices against references, k-means/spectral with bounds and overlap, the
groups file, DDP-correct gathering, and recovery of planted groups from a trained generalist."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, confusion_matrix
from torch.utils.data import TensorDataset
from trainers import quiet_trainer

from kd_lightning.callbacks.confusion_clustering import ConfusionClustering
from kd_lightning.clustering import (
    ClassGroups,
    KMeansGrouping,
    PredictionCollector,
    SpectralGrouping,
    bounded_assignment,
    class_affinity,
    class_matrix,
    cluster_classes,
    confusion_affinity,
    groups_to_labels,
    prediction_covariance,
)
from kd_lightning.datamodules import IndexedDataModule, Synthetic
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule
from kd_lightning.planted import UNEVEN_SETTINGS, planted_hierarchy
from kd_lightning.plots import plot_class_groups


class PermutedSynthetic(Synthetic):
    """Synthetic's planted groups are contiguous label blocks; permuting the labels makes sure a
    clustering that returned contiguous blocks for any input could not pass."""

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.perm = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(seed + 99))
        inverse = torch.argsort(self.perm)  # permuted label -> original class
        self.planted = [self.superclass_of[int(inverse[c])] for c in range(self.num_classes)]

    def load(self, train: bool):
        data, _ = super().load(train)
        x, y = data.tensors
        y = self.perm[y]
        return TensorDataset(x, y), y


def block_matrix(
    sizes: list[int], seed: int = 0, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A covariance-like matrix of planted blocks under a random class permutation: (matrix, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    m = (labels[:, None] == labels[None, :]).astype(float) * 0.5 + np.eye(len(labels))
    m += noise * rng.standard_normal(m.shape)
    m = (m + m.T) / 2
    perm = rng.permutation(len(labels))
    return m[np.ix_(perm, perm)], labels[perm], perm


# ---------------------------------------------------------------------------------------------- maths


def test_covariance_matches_numpy():
    probs = torch.randn(200, 7, generator=torch.Generator().manual_seed(0)).softmax(-1)
    ours = prediction_covariance(probs).numpy()
    np.testing.assert_allclose(ours, np.cov(probs.double().numpy(), rowvar=False), atol=1e-12)


def test_confusion_matches_sklearn_on_hard_predictions():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.7, target, torch.randint(0, 5, (300,), generator=g))
    ours = confusion_affinity(torch.nn.functional.one_hot(pred, 5).float(), target).numpy()
    ref = confusion_matrix(target.numpy(), pred.numpy(), labels=range(5), normalize="true")
    np.testing.assert_allclose(ours, (ref + ref.T) / 2, atol=1e-12)


def test_matrix_names_and_bad_targets():
    probs = torch.full((4, 3), 1 / 3)
    with pytest.raises(
        ValueError, match=r"`matrix` must be one of \['confusion', 'covariance'\], got 'corr'"
    ):
        class_matrix("corr", probs, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 3\)"):
        confusion_affinity(probs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        prediction_covariance(probs[:1])


@pytest.mark.parametrize("grouping", [KMeansGrouping(), KMeansGrouping(normalize=False), SpectralGrouping()])
def test_clustering_recovers_permuted_blocks(grouping):
    m, labels, _ = block_matrix([4, 6, 5, 5])
    groups = cluster_classes(m, 4, grouping)
    assert adjusted_rand_score(labels, groups_to_labels(groups, len(labels))) == 1.0
    assert sorted(len(g) for g in groups) == [4, 5, 5, 6]


@pytest.mark.parametrize("grouping", [None, KMeansGrouping()], ids=["default", "kmeans"])
def test_size_bounds_are_exact_and_checked(grouping):
    m, labels, _ = block_matrix([2, 8, 5, 5])
    groups = cluster_classes(m, 4, grouping, min_size=4, max_size=6)
    assert all(4 <= len(g) <= 6 for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(20))
    # The blocks that fit stay whole.
    found = {tuple(g) for g in groups}
    for block in (0, 2, 3):
        members = tuple(sorted(np.flatnonzero(labels == block).tolist()))
        if 4 <= len(members) <= 6:
            assert members in found
    with pytest.raises(ValueError, match="`min_size`, `max_size`"):
        bounded_assignment(np.zeros((5, 2)), 3, 5)
    with pytest.raises(ValueError, match="`max_size`=3 is too small"):
        cluster_classes(m, 4, max_size=3)
    with pytest.raises(ValueError, match="`num_groups` must be an integer in"):
        cluster_classes(m, 0)


def test_bounded_assignment_is_optimal_by_brute_force():
    rng = np.random.default_rng(3)
    d = rng.random((6, 3))
    ours = bounded_assignment(d, 2, 2)
    best = min(
        (
            (d[np.arange(6), a].sum(), a)
            for a in (np.array(p) for p in np.ndindex(3, 3, 3, 3, 3, 3))
            if (np.bincount(a, minlength=3) == 2).all()
        ),
        key=lambda t: t[0],
    )
    assert d[np.arange(6), ours].sum() == pytest.approx(best[0])


# Planted hierarchies of uneven group sizes (kd_lightning.planted), no training: the default grouping
# must recover every one of them (adjusted Rand index >= 0.95), on every seed.
UNEVEN = UNEVEN_SETTINGS


def _planted_ari(setting: str, seed: int, grouping=None, **bounds) -> tuple[float, list[list[int]]]:
    kwargs = UNEVEN[setting]
    planted = planted_hierarchy(seed=seed, **kwargs)
    groups = cluster_classes(prediction_covariance(planted.probs), kwargs["num_groups"], grouping, **bounds)
    return adjusted_rand_score(planted.group_of, groups_to_labels(groups, kwargs["num_classes"])), groups


@pytest.mark.parametrize("setting", list(UNEVEN))
def test_default_grouping_recovers_uneven_planted_hierarchies(setting):
    """cluster_classes's default and ConfusionClustering's default, 5 seeds each."""
    callback_default = ConfusionClustering(UNEVEN[setting]["num_groups"], "unused.json").grouping
    for seed in range(5):
        ari, _ = _planted_ari(setting, seed)
        assert ari >= 0.95, (setting, seed, ari)
        ari, _ = _planted_ari(setting, seed, callback_default)
        assert ari >= 0.95, (setting, seed, ari)


def test_default_grouping_keeps_size_bounds_on_planted_hierarchies():
    """Bounds the planted groups fit leave them whole; tighter ones hold exactly, splitting the 15s."""
    for seed in range(5):
        ari, groups = _planted_ari("100 classes, 12 groups of 3-15", seed, min_size=3, max_size=15)
        assert ari >= 0.95 and all(3 <= len(g) <= 15 for g in groups), (seed, ari)
        _, groups = _planted_ari("100 classes, 12 groups of 3-15", seed, min_size=5, max_size=12)
        assert all(5 <= len(g) <= 12 for g in groups), [len(g) for g in groups]
        assert sorted(c for g in groups for c in g) == list(range(100))


def test_few_classes_need_the_closure_term():
    """With 10 classes every off-diagonal covariance is negative (the probabilities sum to one), so
    clipping alone leaves no edge; the closure term gives back the confusions beyond chance."""
    planted = planted_hierarchy(**UNEVEN["10 classes, 4 groups of 1-4"], seed=0)
    m = prediction_covariance(planted.probs).numpy()
    off = ~np.eye(10, dtype=bool)
    assert (m[off] < 0).all()
    assert (class_affinity(m, closure=False)[off] == 0).all()
    affinity = class_affinity(m)[off]
    same = (planted.group_of[:, None] == planted.group_of[None, :])[off]
    # Every planted pair is an edge, stronger than any edge across groups (two one-class groups
    # share a weak one: both spread their errors over the same other classes).
    assert (affinity[same] > 0).all() and affinity[~same].max() < affinity[same].min()
    assert SpectralGrouping(closure=False).describe()["closure"] is False


def test_paper_kmeans_is_still_available():
    """Covariance + k-means by name, as the configs spell it, and the paper's raw columns."""
    for grouping in (KMeansGrouping(), KMeansGrouping(normalize=False)):
        assert grouping.describe()["grouping"] == "KMeansGrouping"
    m, labels, _ = block_matrix([5, 5, 5, 5])
    groups = cluster_classes(m, 4, KMeansGrouping())
    assert adjusted_rand_score(labels, groups_to_labels(groups, 20)) == 1.0


def test_overlapping_groups():
    m, _, _ = block_matrix([5, 5, 5, 5])
    groups = cluster_classes(m, 4, overlap=2, max_size=10)
    counts = np.bincount([c for g in groups for c in g], minlength=20)
    assert (counts == 2).all() and all(len(g) <= 10 for g in groups)
    assert len({tuple(g) for g in groups}) == 4


# --------------------------------------------------------------------------------------- groups file


def test_groups_file_round_trip(tmp_path):
    groups = ClassGroups(
        3, ["a", "b", "c"], [[0, 2], [1]], {"matrix": "covariance"}, {"epoch": 1}, np.eye(3).tolist()
    )
    path = groups.save(tmp_path / "g" / "groups.json")
    back = ClassGroups.load(path, num_classes=3)
    assert back == groups and back.named_groups() == [["a", "c"], ["b"]]
    assert json.loads(path.read_text())["format_version"] == 1
    assert back.membership().tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([[0, 1], []], "group 1 is empty"),
        ([[0, 1], [1, 0]], "groups 0 and 1 are duplicates"),
        ([[0, 3]], r"outside the label space \[0, 3\): \[3\]"),
        ([[0, -1]], r"outside the label space \[0, 3\): \[-1\]"),
        ([[0, 0, 1]], "group 0 repeats a class"),
        ([], "`groups` is empty"),
    ],
)
def test_bad_groups_are_clear_errors(tmp_path, groups, message):
    with pytest.raises(ValueError, match=message):
        ClassGroups(3, ["a", "b", "c"], groups)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_classes": 3, "class_names": ["a", "b", "c"], "groups": groups}))
    with pytest.raises(ValueError, match=f"`groups_file` '{path}'.*{message}"):
        ClassGroups.load(path)


def test_groups_file_for_another_label_space(tmp_path):
    path = ClassGroups(3, ["a", "b", "c"], [[0, 1]]).save(tmp_path / "groups.json")
    with pytest.raises(ValueError, match="is for 3 classes, but the data/model has num_classes=10"):
        ClassGroups.load(path, num_classes=10)
    with pytest.raises(FileNotFoundError, match="`groups_file`: no groups file"):
        ClassGroups.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="`class_names` has 2 names for num_classes=3"):
        ClassGroups(3, ["a", "b"], [[0]])


# ------------------------------------------------------------------------------------ gathering, plot


def test_collector_keeps_one_row_per_index():
    collector = PredictionCollector()
    probs = torch.eye(4)[[0, 1, 2, 3]].float()
    collector.update(torch.tensor([3, 1]), probs[:2], torch.tensor([0, 1]))
    # A DistributedSampler pads a shard with a repeat of an earlier sample: same index, same row.
    collector.update(torch.tensor([0, 3]), probs[2:], torch.tensor([2, 0]))
    index, kept, target = collector.compute()
    assert index.tolist() == [0, 1, 3] and target.tolist() == [2, 1, 0]
    assert torch.equal(kept, probs[[2, 1, 0]])


def test_heatmap_is_written(tmp_path):
    m, _, _ = block_matrix([3, 3])
    path = plot_class_groups(m, [[0, 1, 2], [2, 3]], [f"c{i}" for i in range(6)], tmp_path / "h.png", "t")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"`matrix` must be \(5, 5\)"):
        plot_class_groups(m, [[0]], list("abcde"), tmp_path / "x.png")


# --------------------------------------------------------------------------------------- acceptance


def test_trained_generalist_recovers_planted_groups(tmp_path):
    """50 classes in 10 planted super-classes, labels permuted: the callback's groups after training an
    MLP generalist match the planted ones with adjusted Rand index >= 0.9."""
    L.seed_everything(0)
    source = PermutedSynthetic()
    data = IndexedDataModule(source, batch_size=128, eval_batch_size=1000, val_size=1000)
    model = ClassifierModule(
        partial(MLP, hidden=(64,)), 50, (32,), optimizer=partial(torch.optim.AdamW, lr=3e-3)
    )
    callback = ConfusionClustering(10, str(tmp_path / "groups.json"), every_n_epochs=4)
    quiet_trainer(tmp_path, max_epochs=8, callbacks=[callback]).fit(model, data)

    groups = ClassGroups.load(tmp_path / "groups.json", num_classes=50)
    ari = adjusted_rand_score(source.planted, groups_to_labels(groups.groups, 50))
    assert ari >= 0.9, (ari, groups.groups)
    assert groups.method["matrix"] == "covariance" and groups.source["epoch"] == 7
    assert groups.source["data"]["split"] == "val" and np.shape(groups.matrix) == (50, 50)
    assert groups.class_names == source.class_names
    assert (tmp_path / "groups.png").is_file()
    assert callback.state_dict()["groups"] == groups.groups


@pytest.fixture
def six_classes():
    """An untrained 6-class MLP and its data: two superclasses of three classes."""
    L.seed_everything(0)
    source = Synthetic(
        num_superclasses=2, classes_per_superclass=3, dim=8, train_per_class=30, test_per_class=5
    )
    data = IndexedDataModule(source, batch_size=32, eval_batch_size=64, val_size=60)
    return ClassifierModule(partial(MLP, hidden=(8,)), 6, (8,)), data


def test_dedicated_validate_run(tmp_path, six_classes):
    """`trainer.validate` with the callback is a clustering run of an existing model."""
    model, data = six_classes
    callback = ConfusionClustering(2, str(tmp_path / "groups.json"), min_specialist_size=1, plot=False)
    quiet_trainer(tmp_path, callbacks=[callback]).validate(model, data, verbose=False)
    groups = ClassGroups.load(tmp_path / "groups.json", num_classes=6)
    assert sorted(c for g in groups.groups for c in g) == list(range(6))
    assert groups.source["global_step"] == 0 and not (tmp_path / "groups.png").exists()
    assert groups.method["grouping"] == "SpectralGrouping" and groups.method["closure"] is True
    # The paper's k-means, named as a config names it.
    paper = ConfusionClustering(2, str(tmp_path / "kmeans.json"), grouping=KMeansGrouping(), plot=False)
    quiet_trainer(tmp_path, callbacks=[paper]).validate(model, data, verbose=False)
    assert ClassGroups.load(tmp_path / "kmeans.json").method["grouping"] == "KMeansGrouping"
    # Six groups of six classes are all singletons: none is worth a specialist.
    singletons = ConfusionClustering(6, str(tmp_path / "none.json"), min_specialist_size=2)
    with pytest.raises(ValueError, match="smaller than `min_specialist_size`=2"):
        quiet_trainer(tmp_path, callbacks=[singletons]).validate(model, data, verbose=False)


def test_overlap_of_every_group_is_refused():
    """Each class in every group would make every specialist the same: refused, naming the argument."""
    with pytest.raises(ValueError, match="`overlap` must be below `num_groups`=2, got 2"):
        ConfusionClustering(2, "groups.json", overlap=2)
    with pytest.raises(ValueError, match=r"`overlap` must be an integer in \[1, num_groups - 1 = 2\], got 3"):
        cluster_classes(np.eye(3), 3, overlap=3)


def test_overlap_keeps_groups_distinct_when_small_groups_are_each_others_nearest():
    """Pairs {0, 1} ~ {2, 3} and {4, 5} ~ {6, 7} are each other's nearest groups: the nearest second
    memberships would make each pair of groups equal ({0, 1, 2, 3} twice). They stay distinct, and
    still every class is in exactly two groups."""
    blocks = np.repeat(np.arange(4), 2)  # groups {0, 1}, {2, 3}, {4, 5}, {6, 7}
    pairs = blocks // 2  # {0, 1} ~ {2, 3} and {4, 5} ~ {6, 7}
    m = np.eye(8) + 0.5 * (blocks[:, None] == blocks) + 0.2 * (pairs[:, None] == pairs)
    assert cluster_classes(m, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    groups = cluster_classes(m, 4, overlap=2, max_size=4)
    counts = np.bincount([c for g in groups for c in g], minlength=8)
    assert (counts == 2).all() and all(len(g) <= 4 for g in groups)
    assert len({tuple(g) for g in groups}) == 4, groups


class Unnamed(L.LightningDataModule):
    """The validation data of another DataModule, without class names or a fingerprint."""

    def __init__(self, inner: L.LightningDataModule) -> None:
        super().__init__()
        self.inner = inner

    def setup(self, stage: str) -> None:
        self.inner.setup(stage)

    def val_dataloader(self):
        return self.inner.val_dataloader()


def test_groups_file_names_classes_and_data_when_the_datamodule_can(tmp_path, six_classes):
    model, data = six_classes
    named = ConfusionClustering(2, str(tmp_path / "named.json"), min_specialist_size=1, plot=False)
    quiet_trainer(tmp_path, callbacks=[named]).validate(model, data, verbose=False)
    groups = ClassGroups.load(tmp_path / "named.json")
    assert groups.class_names == data.class_names and groups.source["data"] == data.fingerprint("val")
    unnamed = ConfusionClustering(2, str(tmp_path / "unnamed.json"), min_specialist_size=1, plot=False)
    quiet_trainer(tmp_path, callbacks=[unnamed]).validate(model, Unnamed(data), verbose=False)
    groups = ClassGroups.load(tmp_path / "unnamed.json")
    assert groups.class_names == [str(c) for c in range(6)] and "data" not in groups.source


class CountBatches(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.batches += 1


def test_the_model_runs_once_per_validation_batch(tmp_path, six_classes):
    """The callback reads the logits of the step's EvalOutput: no second forward pass."""
    model, data = six_classes
    forwards = []
    model.net.register_forward_hook(lambda *_: forwards.append(1))
    callback = ConfusionClustering(2, str(tmp_path / "groups.json"), min_specialist_size=1, plot=False)
    batches = CountBatches()
    quiet_trainer(tmp_path, callbacks=[callback, batches]).validate(model, data, verbose=False)
    assert batches.batches >= 1 and len(forwards) == batches.batches
    assert callback.groups is not None


def test_a_step_without_eval_output_is_a_clear_error(tmp_path, six_classes):
    class Silent(ClassifierModule):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)

    _, data = six_classes
    callback = ConfusionClustering(2, str(tmp_path / "groups.json"), plot=False)
    with pytest.raises(
        TypeError, match="ConfusionClustering reads the EvalOutput that `Silent.validation_step`"
    ):
        quiet_trainer(tmp_path, callbacks=[callback]).validate(
            Silent(partial(MLP, hidden=(8,)), 6, (8,)), data
        )


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match=r"`matrix` must be one of \['confusion', 'covariance'\], got 'cov'"):
        ConfusionClustering(3, "g.json", matrix="cov")
    with pytest.raises(ValueError, match="`overlap` must be an integer >= 1, got 0"):
        ConfusionClustering(3, "g.json", overlap=0)


def _validate_groups(tmp_path, devices: int, name: str) -> dict:
    L.seed_everything(0)
    source = Synthetic(
        num_superclasses=3, classes_per_superclass=3, dim=8, train_per_class=40, test_per_class=5
    )
    # 91 validation samples: two processes get 46 each, one of them a padded repeat.
    data = IndexedDataModule(source, batch_size=32, eval_batch_size=16, val_size=91)
    torch.manual_seed(0)
    model = ClassifierModule(partial(MLP, hidden=(8,)), 9, (8,))
    callback = ConfusionClustering(3, str(tmp_path / f"{name}.json"), plot=False)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    quiet_trainer(tmp_path, devices=devices, strategy=strategy, callbacks=[callback]).validate(
        model, data, verbose=False
    )
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow  # two spawned processes: about 20 s on a busy 2-core machine
def test_matrix_is_the_same_on_two_processes(tmp_path):
    """Under DDP (2 CPU processes, gloo) the gathered predictions, hence the matrix and the groups,
    equal the single-process ones: padding repeats are dropped by index."""
    one = _validate_groups(tmp_path, 1, "one")
    two = _validate_groups(tmp_path, 2, "two")
    # The matrix is a mean over the validation samples: fp32 sums in another order, eps per summed term.
    n = 91  # validation samples (`val_size` of `_validate_groups`); matrix entries are at most 1
    np.testing.assert_allclose(
        np.array(two["matrix"]), np.array(one["matrix"]), atol=n * float(np.finfo(np.float32).eps)
    )
    assert two["groups"] == one["groups"]


def test_overlap_threshold_gives_border_classes_more_groups_and_inner_classes_one():
    """Four blocks of four; class 3 is confused with blocks 1 and 2, class 7 with block 2. With a
    threshold only those join further groups, so the number of groups covering a class is 3, 2 or 1
    (the rows of the paper's Table 4) instead of ``overlap`` for every class."""
    blocks = np.repeat(np.arange(4), 4)
    m = (blocks[:, None] == blocks).astype(float)
    for c, others in ((3, range(4, 12)), (7, range(8, 12))):
        m[c, list(others)] = m[list(others), c] = 0.5
    groups = cluster_classes(m, 4, overlap=3, overlap_threshold=0.2)
    counts = np.bincount([c for g in groups for c in g], minlength=16)
    assert counts[3] == 3 and counts[7] == 2
    assert (np.delete(counts, [3, 7]) == 1).all()
    # Without the threshold every class is in exactly `overlap` groups.
    exact = cluster_classes(m, 4, overlap=2)
    assert (np.bincount([c for g in exact for c in g], minlength=16) == 2).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_overlap_threshold_must_be_positive(bad):
    with pytest.raises(ValueError, match="`overlap_threshold` must be a positive number or None"):
        cluster_classes(np.eye(4), 2, overlap=1, overlap_threshold=bad)
