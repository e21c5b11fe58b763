"""Generalist + specialists (Hinton, Vinyals & Dean 2015, section 5).

A *specialist* classifies one group of confusable classes plus one *dustbin* class for all others. It
starts from the generalist's weights, trains on batches that over-represent its group, and corrects its
dustbin logit for that oversampling afterwards. At inference the generalist picks its top-``n`` classes,
the specialists whose groups meet them are run, and the full distribution ``q`` minimising
``KL(p_g || q) + sum_m KL(p_m || fold_m(q))`` combines them (``fold_m`` sums ``q``'s mass outside
group ``m`` into its dustbin).

The maths are pure functions (:func:`dustbin_correction`, :func:`fold_to_group`,
:func:`active_specialists`, :func:`kl_combination`, :func:`average_specialists`,
:func:`specialist_report`); :class:`SpecialistModule` trains one specialist and
:class:`SpecialistEnsemble` evaluates the combination against the generalist alone and against
averaging the most confident specialists.

**Head rule.** The *head* of a network is its last :class:`torch.nn.Linear` in registration order
(``net.modules()``), which must output the logits. This holds for every network in
:mod:`kd_lightning.models` and :mod:`kd_lightning.resnets`. A specialist is initialised from the
generalist by copying every parameter and buffer except the head's, then the head's rows of the group's
classes; its dustbin row starts as the mean of the other rows with ``log(#others)`` added to the bias, a
first guess at the log-sum-exp of the other classes' logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from kd_lightning.clustering import ClassGroups, first_per_index
from kd_lightning.costs import forward_flops
from kd_lightning.losses import check_temperature, check_weight, soft_target_loss
from kd_lightning.modules import CLASS_KEY, ClassifierBase, NetFactory, load_teacher, stage_metrics
from kd_lightning.optim import Schedule

# Checkpoint entry naming the group a specialist was trained for, so an ensemble can refuse a
# checkpoint trained for another group or another label space.
SPECIALIST_KEY = "kd_lightning_specialist"

# --------------------------------------------------------------------------------------------------
# Pure maths


def oversampling_factor(data_fraction: float, batch_fraction: float) -> float:
    """How much more likely the group is, against the rest, in the training batches than in the data.

    The ratio of the group's odds: ``(r / (1 - r)) / (f / (1 - f))`` for a group that makes up a
    fraction ``f`` of the data and ``r`` of the batches.

    Args:
        data_fraction: ``f``, the group's share of the training data, in ``(0, 1)``.
        batch_fraction: ``r``, the group's share of the training batches, in ``(0, 1)``.

    Raises:
        ValueError: a fraction outside ``(0, 1)`` (the message names it).

    Example:
        >>> oversampling_factor(0.1, 0.5)
        9.0
    """
    for name, value in (("data_fraction", data_fraction), ("batch_fraction", batch_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must lie in (0, 1), got {value!r}.")
    return (batch_fraction / (1 - batch_fraction)) / (data_fraction / (1 - data_fraction))


def dustbin_correction(data_fraction: float, batch_fraction: float) -> float:
    """What to add to a specialist's dustbin logit after training on oversampled batches.

    A classifier trained where class ``y`` has prior ``pi_train(y)`` estimates
    ``p(y|x) * pi_train(y) / pi(y)`` up to normalisation; dividing the prior ratio back out turns it
    into the posterior under the data's prior ``pi``. For a specialist the ratio is the same for all
    its group's classes (``r / f``) and ``(1 - r) / (1 - f)`` for the dustbin, so, up to a constant
    that softmax ignores, the correction is ``log`` of :func:`oversampling_factor` added to the dustbin
    logit. The paper says "incremented by the log of the proportion by which the specialist class is
    oversampled"; this is that proportion measured on the odds, which is exact (``log(r / f)`` alone
    forgets that the dustbin was undersampled at the same time).

    Example:
        >>> round(dustbin_correction(0.1, 0.5), 4) == round(math.log(9.0), 4)
        True
        >>> dustbin_correction(0.3, 0.3)
        0.0
    """
    return math.log(oversampling_factor(data_fraction, batch_fraction))


def relabel_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """``(C,)`` map from a full-space label to a specialist label: position in ``classes``, else the
    dustbin ``len(classes)``.

    Example:
        >>> relabel_map([3, 1], 5).tolist()
        [2, 1, 2, 0, 2]
    """
    out = torch.full((num_classes,), len(classes), dtype=torch.long)
    out[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return out


def fold_to_group(probs: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
    """A full distribution seen by a specialist: its group's classes, then all other mass in the dustbin.

    Args:
        probs: ``(N, C)`` probabilities.
        classes: the group's class ids.

    Returns:
        ``(N, G + 1)``.

    Example:
        >>> fold_to_group(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), [2, 0])
        tensor([[0.3000, 0.1000, 0.6000]])
    """
    classes = torch.as_tensor(classes, dtype=torch.long, device=probs.device)
    inside = probs[:, classes]
    outside = probs.sum(-1, keepdim=True) - inside.sum(-1, keepdim=True)
    return torch.cat([inside, outside.clamp_min(0)], -1)


def fold_log_probs(log_probs: Tensor, classes: Tensor) -> Tensor:
    """:func:`fold_to_group` in log space (the dustbin is a log-sum-exp), for targets of a loss."""
    outside = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    outside[classes] = False
    dustbin = torch.logsumexp(log_probs[:, outside], -1, keepdim=True)
    return torch.cat([log_probs[:, classes], dustbin], -1)


def active_specialists(generalist_probs: Tensor, membership: Tensor, top_n: int = 1) -> Tensor:
    """Which specialists to run: those whose group contains one of the generalist's top-``n`` classes.

    Args:
        generalist_probs: ``(N, C)``.
        membership: ``(M, C)`` bool, ``[m, c]`` when class ``c`` is in specialist ``m``'s group.
        top_n: how many of the generalist's best classes to look at (the paper uses 1).

    Returns:
        ``(N, M)`` bool.

    Example:
        >>> p = torch.tensor([[0.6, 0.3, 0.1]]); mem = torch.tensor([[1, 0, 0], [0, 1, 1]]).bool()
        >>> active_specialists(p, mem, 1).tolist(), active_specialists(p, mem, 2).tolist()
        ([[True, False]], [[True, True]])
    """
    if not (isinstance(top_n, int) and 1 <= top_n <= generalist_probs.shape[-1]):
        raise ValueError(f"`top_n` must be an integer in [1, {generalist_probs.shape[-1]}], got {top_n!r}.")
    top = generalist_probs.topk(top_n, dim=-1).indices  # (N, n)
    return membership.to(generalist_probs.device)[:, top].any(-1).T


class _Specialists(NamedTuple):
    """Checked specialist inputs as dense tensors."""

    membership: Tensor  # (M, C) float, 1 where class c is in group m
    weight: Tensor  # (N, M) float, 1 where specialist m is active for input n
    inside: Tensor  # (N, C) sum over active specialists of their probability on class c
    dust: Tensor  # (N, M) dustbin probability of each active specialist (0 where inactive)
    neg_entropy: Tensor  # (N,) sum over active specialists of sum_j p_m(j) log p_m(j)


def _specialist_tensors(
    generalist_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    groups: Sequence[Tensor | Sequence[int]],
    active: Tensor | None,
) -> _Specialists:
    n, c = generalist_probs.shape
    if len(specialist_probs) != len(groups):
        raise ValueError(
            f"one group per specialist: got {len(specialist_probs)} `specialist_probs` and {len(groups)} `groups`."
        )
    m = len(groups)
    device, dtype = generalist_probs.device, generalist_probs.dtype
    membership = torch.zeros(m, c, dtype=dtype, device=device)
    inside = torch.zeros(n, c, dtype=dtype, device=device)
    dust = torch.zeros(n, m, dtype=dtype, device=device)
    neg_entropy = torch.zeros(n, dtype=dtype, device=device)
    if active is None:
        active = torch.ones(n, m, dtype=torch.bool, device=device)
    if active.shape != (n, m):
        raise ValueError(f"`active` must have shape ({n}, {m}), got {tuple(active.shape)}.")
    for k, (probs, members) in enumerate(zip(specialist_probs, groups, strict=True)):
        members = torch.as_tensor(members, dtype=torch.long, device=device)
        if probs.shape != (n, len(members) + 1):
            raise ValueError(
                f"`specialist_probs[{k}]` must have shape ({n}, {len(members) + 1}) for a group of "
                f"{len(members)} classes plus the dustbin, got {tuple(probs.shape)}."
            )
        membership[k, members] = 1.0
        # Inactive rows may hold anything (they were not computed): zeroed, so no NaN leaks through.
        p = torch.where(active[:, k : k + 1], probs.to(dtype), torch.zeros((), dtype=dtype, device=device))
        inside[:, members] += p[:, :-1]
        dust[:, k] = p[:, -1]
        neg_entropy += torch.xlogy(p, p).sum(-1)
    return _Specialists(membership, active.to(dtype), inside, dust, neg_entropy)


class KLCombination(NamedTuple):
    """What :func:`kl_combination` returns."""

    probs: Tensor  # (N, C) the combined distribution q
    objective: Tensor  # (N,) KL(p_g || q) + sum_m KL(p_m || fold_m q) at q
    iterations: int  # iterations run
    converged: Tensor  # (N,) bool: the last iteration decreased the objective by at most `tol`


def combination_objective(
    q: Tensor,
    generalist_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    groups: Sequence[Tensor | Sequence[int]],
    active: Tensor | None = None,
) -> Tensor:
    """``KL(p_g || q) + sum_{m active} KL(p_m || fold_m(q))`` for each row (the paper's equation 5).

    Example:
        >>> p = torch.tensor([[0.5, 0.3, 0.2]])
        >>> abs(float(combination_objective(p, p, [fold_to_group(p, [0])], [[0]]))) < 1e-6
        True
    """
    pg = generalist_probs.double()
    return _objective(q.double(), pg, _specialist_tensors(pg, specialist_probs, groups, active))


def _objective(q: Tensor, pg: Tensor, s: _Specialists) -> Tensor:
    tiny = torch.finfo(q.dtype).tiny
    outside = q @ (1 - s.membership).T  # q's mass outside each group, without computing 1 - (1 - eps)
    # KL = sum p log p - sum p log q over every distribution; `inside` already sums the specialists'
    # group mass per class, so their cross terms on classes are one xlogy. xlogy makes 0 log 0 = 0.
    neg_entropy = torch.xlogy(pg, pg).sum(-1) + s.neg_entropy
    cross = torch.xlogy(pg + s.inside, q.clamp_min(tiny)).sum(-1)
    cross = cross + (s.dust * outside.clamp_min(tiny).log()).sum(-1)
    return neg_entropy - cross


def kl_combination(
    generalist_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    groups: Sequence[Tensor | Sequence[int]],
    active: Tensor | None = None,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> KLCombination:
    """Combine a generalist and its specialists into one distribution per input (Hinton et al. 2015, §5.3).

    Finds ``q`` minimising ``KL(p_g || q) + sum_{m active} KL(p_m || fold_m(q))``, where ``p_m`` is
    specialist ``m``'s distribution over its group plus the dustbin and ``fold_m(q)`` puts ``q``'s
    mass outside the group into the dustbin. The paper descends the gradient of ``q = softmax(z)``;
    this solver runs the EM iteration of that objective, which is a coarsened-data multinomial
    likelihood: each specialist's dustbin mass is shared among the classes outside its group in
    proportion to the current ``q``, then ``q`` is the normalised total,

        ``q_c <- (p_g(c) + sum_m [c in G_m] p_m(c) + q_c sum_m [c not in G_m] p_m(dustbin) / q(not G_m)) / (1 + M_active)``.

    Every step decreases the objective (EM's monotonicity), stays on the simplex, needs no step size,
    and costs two ``(N, C) x (C, M)`` products for the whole batch at once, on the inputs' device.

    Stopping rule: stop when no row's objective fell by more than ``tol`` nats in the last iteration, or
    after ``max_iter`` iterations. Rows with no active specialist are exact after one step (``q = p_g``).

    Args:
        generalist_probs: ``(N, C)`` the generalist's probabilities ``p_g``.
        specialist_probs: ``M`` tensors ``(N, G_m + 1)``, group classes then dustbin. Rows where the
            specialist is inactive are ignored.
        groups: ``M`` class-id lists, in the order of the specialists' outputs.
        active: ``(N, M)`` bool, which specialist counts for which input (default: all).
        max_iter: iteration cap.
        tol: stopping tolerance on the per-row decrease of the objective, in nats.

    Returns:
        :class:`KLCombination` ``(probs, objective, iterations, converged)``.

    Raises:
        ValueError: shapes disagree, or a bad ``max_iter``/``tol``.

    Example:
        >>> pg = torch.tensor([[0.5, 0.3, 0.2]])
        >>> pm = torch.tensor([[0.1, 0.7, 0.2, 0.0]])  # one specialist over all three classes
        >>> kl_combination(pg, [pm], [[0, 1, 2]]).probs  # the mean of the two
        tensor([[0.3000, 0.5000, 0.2000]])
    """
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    if not tol >= 0:
        raise ValueError(f"`tol` must be >= 0, got {tol!r}.")
    if generalist_probs.ndim != 2:
        raise ValueError(f"`generalist_probs` must be (N, C), got shape {tuple(generalist_probs.shape)}.")
    # fp64: the stopping rule compares objective decreases of ~1e-7 nats on values of order 1, below
    # fp32's resolution; the solver is a few (N, C) x (C, M) products, cheap even in fp64.
    pg = generalist_probs.double()
    s = _specialist_tensors(pg, specialist_probs, groups, active)
    outside_of = 1 - s.membership  # (M, C)
    total = 1.0 + s.weight.sum(-1, keepdim=True)  # every distribution has mass 1
    fixed = pg + s.inside  # the part of the update that does not depend on q
    needs_dust = s.dust.sum(-1) > 0
    # Start from the generalist, floored so that no class a specialist's dustbin may need is at 0
    # (EM never revives a class at exactly 0).
    q = (pg + 1e-6 / pg.shape[-1]) / (1 + 1e-6)
    objective = _objective(q, pg, s)
    iterations, decrease = 0, torch.full_like(objective, float("inf"))
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        outside = (q @ outside_of.T).clamp_min(torch.finfo(q.dtype).tiny)  # (N, M)
        share = s.dust / outside  # dustbin mass per unit of q outside each group
        q = (fixed + q * (share @ outside_of)) / total
        new = _objective(q, pg, s)
        decrease = objective - new
        objective = new
        if not bool(needs_dust.any()) or bool((decrease <= tol).all()):
            break
    out_dtype = torch.promote_types(generalist_probs.dtype, torch.float32)
    return KLCombination(q.to(out_dtype), objective.to(out_dtype), iterations, decrease <= tol)


def spread_dustbin(specialist_probs: Tensor, classes: Tensor, generalist_probs: Tensor) -> Tensor:
    """A specialist's distribution in the full label space: its dustbin mass shared among the classes
    outside its group in proportion to the generalist's probabilities.

    Example:
        >>> pg = torch.tensor([[0.2, 0.6, 0.2]]); pm = torch.tensor([[0.5, 0.5]])
        >>> spread_dustbin(pm, torch.tensor([0]), pg).tolist()
        [[0.5, 0.375, 0.125]]
    """
    pg = generalist_probs.float()
    outside = torch.ones(pg.shape[-1], dtype=torch.bool, device=pg.device)
    outside[classes] = False
    rest = pg * outside
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(torch.finfo(pg.dtype).tiny)
    full = rest * specialist_probs[:, -1:].float()
    full[:, classes] = specialist_probs[:, :-1].float()
    return full


def average_specialists(
    generalist_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    groups: Sequence[Tensor | Sequence[int]],
    active: Tensor,
    top: int = 1,
) -> Tensor:
    """The simple alternative: average the ``top`` most confident active specialists.

    Each specialist is mapped to the full label space with :func:`spread_dustbin`; its confidence is its
    largest probability on a group class. Inputs with no active specialist keep ``p_g``.

    Args:
        generalist_probs: ``(N, C)``.
        specialist_probs: ``M`` tensors ``(N, G_m + 1)``.
        groups: ``M`` class-id lists.
        active: ``(N, M)`` bool.
        top: how many specialists to average at most.

    Returns:
        ``(N, C)`` probabilities.

    Example:
        >>> pg = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
        >>> pm = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
        >>> average_specialists(pg, [pm], [[0, 1]], torch.tensor([[True], [False]]))[:, 1]
        tensor([0.8000, 0.3000])
    """
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"`top` must be a positive integer, got {top!r}.")
    pg = generalist_probs.float()
    if not specialist_probs:
        return pg
    device = pg.device
    full = torch.stack(
        [
            spread_dustbin(p, torch.as_tensor(g, dtype=torch.long, device=device), pg)
            for p, g in zip(specialist_probs, groups, strict=True)
        ],
        1,
    )  # (N, M, C)
    confidence = torch.stack([p[:, :-1].float().amax(-1) for p in specialist_probs], 1)
    confidence = confidence.masked_fill(~active, -1.0)
    k = min(top, len(specialist_probs))
    best = confidence.topk(k, dim=-1)
    chosen = best.values >= 0  # (N, k): an active specialist in that rank
    picked = full.gather(1, best.indices[..., None].expand(-1, -1, pg.shape[-1]))
    count = chosen.sum(-1, keepdim=True)
    mean = (picked * chosen[..., None]).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, pg)


def specialist_report(
    target: Tensor,
    predictions: dict[str, Tensor],
    covered: Tensor,
    conditional_predictions: dict[str, Tensor] | None = None,
    in_specialist_classes: Tensor | None = None,
    baseline: str = "generalist",
) -> dict[str, Any]:
    """Accuracies of several predictors, overall, conditional and by how many specialists cover the
    true class (the paper's Tables 3 and 4).

    Args:
        target: ``(N,)`` true classes.
        predictions: name -> ``(N,)`` predicted classes.
        covered: ``(N,)`` number of specialists whose group contains the true class.
        conditional_predictions: name -> ``(N,)`` predictions restricted to the specialists' classes.
        in_specialist_classes: ``(N,)`` bool, the true class belongs to some specialist's group.
        baseline: the name the per-coverage change is measured against.

    Returns:
        ``{"acc": {name: float}, "cond_acc": {name: float}, "by_cover": [{"cover", "count",
        "acc": {name: float}, "delta": {name: float}, "relative": {name: float}}]}`` (``delta``
        in accuracy points, ``relative`` in % of the baseline's accuracy).

    Example:
        >>> y = torch.tensor([0, 1, 2, 2]); cover = torch.tensor([0, 1, 1, 1])
        >>> r = specialist_report(y, {"generalist": torch.tensor([0, 0, 2, 1]), "kl": torch.tensor([0, 1, 2, 1])}, cover)
        >>> r["acc"], round(r["by_cover"][1]["delta"]["kl"], 4)
        ({'generalist': 0.5, 'kl': 0.75}, 0.3333)
    """
    if baseline not in predictions:
        raise ValueError(f"`baseline` must be one of {sorted(predictions)}, got {baseline!r}.")

    def acc(pred: Tensor, mask: Tensor) -> float:
        return float((pred[mask] == target[mask]).float().mean()) if bool(mask.any()) else float("nan")

    everything = torch.ones_like(target, dtype=torch.bool)
    report: dict[str, Any] = {"count": int(target.numel())}
    report["acc"] = {name: acc(pred, everything) for name, pred in predictions.items()}
    if conditional_predictions is not None and in_specialist_classes is not None:
        report["cond_count"] = int(in_specialist_classes.sum())
        report["cond_acc"] = {
            name: acc(pred, in_specialist_classes) for name, pred in conditional_predictions.items()
        }
    rows = []
    for k in sorted(set(covered.tolist())):
        mask = covered == k
        accs = {name: acc(pred, mask) for name, pred in predictions.items()}
        base = accs[baseline]
        rows.append(
            {
                "cover": int(k),
                "count": int(mask.sum()),
                "acc": accs,
                "delta": {name: a - base for name, a in accs.items()},
                "relative": {
                    name: 100 * (a - base) / base if base else float("nan") for name, a in accs.items()
                },
            }
        )
    report["by_cover"] = rows
    return report


# --------------------------------------------------------------------------------------------------
# Initialisation from the generalist


def head_layer(net: nn.Module) -> tuple[str, nn.Linear]:
    """The network's head under this module's rule: its last :class:`~torch.nn.Linear` in ``modules()``
    order, returned with its qualified name.

    Raises:
        ValueError: the network has no ``nn.Linear``.

    Example:
        >>> head_layer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))[0]
        '2'
    """
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(
            f"{type(net).__name__} has no nn.Linear: a specialist's head is the network's last nn.Linear, "
            "which must output the logits."
        )
    return found


@torch.no_grad()
def init_from_generalist(specialist: nn.Module, generalist: nn.Module, classes: Sequence[int]) -> None:
    """Copy the generalist into the specialist: every weight and buffer, and the head's group rows.

    The two networks must be the same architecture except for the head's number of outputs (``C``
    for the generalist, ``G + 1`` for the specialist). Before any training, the specialist's group
    logits equal the generalist's logits of those classes.

    Raises:
        ValueError: the heads do not have the expected sizes, or the architectures differ elsewhere.
    """
    classes = list(classes)
    s_name, s_head = head_layer(specialist)
    g_name, g_head = head_layer(generalist)
    if s_head.out_features != len(classes) + 1:
        raise ValueError(
            f"the specialist's head ({s_name!r}, the last nn.Linear) outputs {s_head.out_features} logits, "
            f"expected {len(classes) + 1} (a group of {len(classes)} classes plus the dustbin)."
        )
    num_classes = g_head.out_features
    if max(classes) >= num_classes:
        raise ValueError(
            f"the group's classes {classes} do not fit the generalist's head, which outputs {num_classes} logits."
        )
    head_keys = {f"{s_name}.weight", f"{s_name}.bias"}
    state = {k: v for k, v in generalist.state_dict().items() if not k.startswith(f"{g_name}.")}
    target = specialist.state_dict()
    body = {k for k in target if k not in head_keys}
    if set(state) != body or any(state[k].shape != target[k].shape for k in body):
        missing, extra = sorted(body - set(state)), sorted(set(state) - body)
        shapes = sorted(k for k in body & set(state) if state[k].shape != target[k].shape)
        raise ValueError(
            "the specialist's network must be the generalist's architecture with another head: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, different shapes {shapes[:5]}."
        )
    specialist.load_state_dict({**target, **state})
    rows = torch.as_tensor(classes, dtype=torch.long, device=g_head.weight.device)
    rest = torch.ones(num_classes, dtype=torch.bool, device=g_head.weight.device)
    rest[rows] = False
    weight = torch.cat([g_head.weight[rows], g_head.weight[rest].mean(0, keepdim=True)])
    s_head.weight.copy_(weight)
    if s_head.bias is not None:
        g_bias = g_head.bias if g_head.bias is not None else torch.zeros(num_classes, device=weight.device)
        dust = g_bias[rest].mean() + math.log(int(rest.sum()))
        s_head.bias.copy_(torch.cat([g_bias[rows], dust.reshape(1)]))


# --------------------------------------------------------------------------------------------------
# Modules


@dataclass(frozen=True)
class GroupSampling:
    """How a DataModule samples a specialist's group: which classes, their share of the data and of
    the training batches. A DataModule exposes it as ``group_sampling`` (e.g.
    ``kd_lightning.datamodules.SpecialistDataModule``); :class:`SpecialistModule` turns it into the dustbin
    correction."""

    classes: tuple[int, ...]
    data_fraction: float
    batch_fraction: float

    @property
    def correction(self) -> float:
        return dustbin_correction(self.data_fraction, self.batch_fraction)


def _check_classes(classes: Sequence[int], num_classes: int) -> None:
    """A specialist's group: non-empty, no repeats, inside ``[0, num_classes)``, not every class."""
    if len(classes) == 0:
        raise ValueError("`classes` is empty: a specialist needs at least one class of its own.")
    bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"`classes` has ids outside the label space [0, {num_classes}): {bad}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"`classes` repeats a class: {list(classes)}.")
    if len(classes) >= num_classes:
        raise ValueError(
            f"the group covers all {num_classes} classes: a specialist needs at least one class outside "
            "its group for the dustbin."
        )


def _load_generalist(path: str) -> L.LightningModule:
    if not Path(path).is_file():
        raise FileNotFoundError(f"`generalist_ckpt`: no checkpoint file at {str(path)!r}.")
    try:
        return load_teacher(path)
    except ValueError as err:  # load_teacher names its own argument; say which one the user gave
        raise ValueError(str(err).replace("`teacher_ckpt`", "`generalist_ckpt`")) from err


class SpecialistModule(ClassifierBase):
    """One specialist: a classifier over one group's classes plus a dustbin class for all the others.

    Built from a groups file (``groups_file``, ``group``) or from explicit ``classes``; initialised
    from ``generalist_ckpt`` when given (see :func:`init_from_generalist`). Training uses the raw
    logits against ``batch["specialist_target"]`` (or the dustbin relabelling of ``batch["target"]``);
    ``forward`` and evaluation add the dustbin correction, which is computed at the start of fitting
    from the DataModule's ``group_sampling`` (:class:`GroupSampling`; none means natural sampling,
    correction 0) and saved in the checkpoint as the buffer ``dustbin_shift``.

    With ``soft_weight > 0`` the loss adds the generalist's soft targets folded onto the specialist's
    labels (the paper's section 6 proposal against overfitting): ``(1 - w) * CE + w * T^2 KL``. The
    folded targets are moved to the training batches' prior (dustbin logit minus the correction), so the
    one correction at inference serves both terms.

    Logs ``{train,val,test}/loss`` and ``/acc`` over the ``G + 1`` specialist labels, and on training
    ``train/hard`` and ``train/soft`` when soft targets are used.

    Args:
        net: network factory, the generalist's architecture (its head gets ``G + 1`` outputs).
        num_classes: full label space, linked from the DataModule.
        input_shape: linked from the DataModule.
        groups_file: a groups file (docs/architecture.md) for ``num_classes`` classes.
        group: which group of that file.
        classes: the group's classes given directly, instead of ``groups_file``.
        generalist_ckpt: checkpoint of the generalist to start from (and take soft targets from).
        soft_weight: weight ``w`` in ``[0, 1]`` of the generalist's soft targets.
        temperature: temperature of the soft-target term.
        optimizer: optimizer factory over the specialist's parameters.
        lr_schedule: optional schedule.

    Raises:
        ValueError: the groups file is for another number of classes or is malformed; ``group`` is
            out of range; both or neither of ``groups_file`` and ``classes``; the group leaves no class
            for the dustbin; ``soft_weight > 0`` without a generalist.
        FileNotFoundError: ``groups_file`` or ``generalist_ckpt`` does not exist.
    """

    def __init__(
        self,
        net: NetFactory,
        num_classes: int,
        input_shape: tuple[int, ...],
        groups_file: str | None = None,
        group: int = 0,
        classes: list[int] | None = None,
        generalist_ckpt: str | None = None,
        soft_weight: float = 0.0,
        temperature: float = 2.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
    ) -> None:
        super().__init__(num_classes, input_shape, optimizer, lr_schedule, agreement=False)
        self.save_hyperparameters()
        check_weight(soft_weight, "soft_weight")
        check_temperature(temperature)
        if (groups_file is None) == (classes is None):
            raise ValueError(
                "give the specialist's classes once: either `groups_file` (with `group`) or `classes`, "
                f"got groups_file={groups_file!r} and classes={classes!r}."
            )
        if groups_file is not None:
            classes = ClassGroups.load(groups_file, num_classes).group(group)
        assert classes is not None
        _check_classes(classes, num_classes)
        self.group = group
        self.group_classes = [int(c) for c in classes]
        self.soft_weight = soft_weight
        self.temperature = temperature
        self.register_buffer("classes", torch.tensor(self.group_classes, dtype=torch.long))
        self.register_buffer("label_map", relabel_map(self.group_classes, num_classes))
        self.register_buffer("dustbin_shift", torch.zeros(()))
        self.metrics = stage_metrics(len(self.group_classes) + 1, agreement=False)
        self.net = net(self.input_shape, len(self.group_classes) + 1)
        head_name, head = head_layer(self.net)
        if head.out_features != len(self.group_classes) + 1:
            raise ValueError(
                f"`net`'s last nn.Linear ({head_name!r}) outputs {head.out_features} features, but the head "
                f"must output the logits ({len(self.group_classes) + 1} for this specialist)."
            )
        self.generalist: nn.Module | None = None
        if generalist_ckpt is not None:
            generalist = _load_generalist(generalist_ckpt)
            if getattr(generalist, "num_classes", num_classes) != num_classes:
                raise ValueError(
                    f"`generalist_ckpt` predicts {generalist.num_classes} classes, but num_classes={num_classes}."
                )
            init_from_generalist(self.net, generalist.net, self.group_classes)
            if soft_weight > 0:
                self.generalist = generalist.eval().requires_grad_(False)
        elif soft_weight > 0:
            raise ValueError(f"`soft_weight`={soft_weight} > 0 needs the generalist: pass `generalist_ckpt`.")

    @property
    def num_outputs(self) -> int:
        return len(self.group_classes) + 1

    def raw_logits(self, x: Tensor) -> Tensor:
        """Logits as trained, under the oversampled batches' prior."""
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits under the data's prior: the dustbin logit plus the oversampling correction."""
        logits = self.net(x)
        shift = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        shift[-1] = self.dustbin_shift
        return logits + shift

    def train(self, mode: bool = True) -> SpecialistModule:
        # Lightning restores submodules to train mode after validation; a frozen generalist stays in eval.
        super().train(mode)
        if self.generalist is not None:
            self.generalist.eval()
        return self

    def specialist_target(self, batch: dict[str, Any]) -> Tensor:
        """``batch["specialist_target"]`` when the DataModule added it, else the relabelled ``target``."""
        if "specialist_target" in batch:
            return batch["specialist_target"]
        return self.label_map[batch["target"]]

    def on_fit_start(self) -> None:
        self._set_correction(getattr(self.trainer.datamodule, "group_sampling", None))

    def _set_correction(self, sampling: GroupSampling | None) -> None:
        if sampling is None:  # natural sampling: the training prior is the data's
            self.dustbin_shift.zero_()
            return
        if list(sampling.classes) != self.group_classes:
            raise ValueError(
                f"the DataModule oversamples classes {list(sampling.classes)}, but this specialist is for "
                f"group {self.group} = {self.group_classes}."
            )
        self.dustbin_shift.fill_(sampling.correction)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self.raw_logits(batch["input"])
        target = self.specialist_target(batch)
        hard = F.cross_entropy(logits.float(), target)
        losses = {"loss": hard}
        if self.generalist is not None and self.soft_weight > 0:
            # no_grad, not inference_mode: the result is a loss target.
            with torch.no_grad():
                folded = fold_log_probs(
                    F.log_softmax(self.generalist(batch["input"]).float(), -1), self.classes
                )
                folded[:, -1] -= self.dustbin_shift
            soft = soft_target_loss(logits, folded, self.temperature)
            losses = {
                "loss": (1 - self.soft_weight) * hard + self.soft_weight * soft,
                "hard": hard,
                "soft": soft,
            }
        self._log_step("train", losses, logits, target)
        return losses["loss"]

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        logits = self(batch["input"])
        target = self.specialist_target(batch)
        self._log_step(stage, {"loss": F.cross_entropy(logits.float(), target)}, logits, target)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "logits": self(batch["input"]).float()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SPECIALIST_KEY] = {
            "group": self.group,
            "classes": self.group_classes,
            "num_classes": self.num_classes,
            "groups_file": self.hparams.get("groups_file"),
        }
        # The generalist is reloaded from `generalist_ckpt`; it is not part of the specialist.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("generalist.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.generalist is not None:
            state = checkpoint["state_dict"]
            for key, value in self.generalist.state_dict().items():
                state.setdefault(f"generalist.{key}", value)


def load_specialist(path: str | Path) -> SpecialistModule:
    """Load a trained specialist for inference, from its checkpoint alone.

    The group's classes come from the checkpoint, so neither the groups file nor the generalist
    checkpoint has to exist any more.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a specialist checkpoint of this package.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`specialist_ckpts`: no checkpoint file at {str(path)!r}.")
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    info = checkpoint.get(SPECIALIST_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise ValueError(
            f"`specialist_ckpts`: {str(path)!r} is not a specialist checkpoint (no {SPECIALIST_KEY!r} entry; "
            f"written by {checkpoint.get(CLASS_KEY) if isinstance(checkpoint, dict) else 'something else'})."
        )
    module = SpecialistModule.load_from_checkpoint(
        path,
        map_location="cpu",
        weights_only=False,
        groups_file=None,
        classes=info["classes"],
        group=info["group"],
        generalist_ckpt=None,
        soft_weight=0.0,
    )
    return module.eval().requires_grad_(False)


class _EvalRecords(Metric):
    """Per-sample integer records ``(N, R)`` keyed by index, gathered across processes, padding dropped."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, rows: Tensor) -> None:
        self.index.append(index.long())
        self.rows.append(rows.long())

    def compute(self) -> Tensor:
        # After a DDP sync the list states are already concatenated tensors.
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("no evaluation batch was recorded.")
        index, rows = dim_zero_cat(self.index), dim_zero_cat(self.rows)
        return rows[first_per_index(index)]


# Leading columns of the per-sample records; one column per specialist (active or not) follows.
METHODS = ("generalist", "kl", "average")
_COLUMNS = ("target", *METHODS, *(f"cond_{m}" for m in METHODS), "covered")


class SpecialistEnsemble(L.LightningModule):
    """Evaluate a generalist with its specialists (Hinton et al. 2015, §5.3): ``kd test`` / ``kd validate``.

    For each input: the generalist's top-``top_n`` classes activate every specialist whose group
    contains one; each specialist runs only on the inputs it is active for; the outputs are combined by
    :func:`kl_combination` (the model's prediction). Two simple alternatives are scored on the same
    forward passes: the generalist alone and :func:`average_specialists`.

    Logs, per stage: ``acc`` (KL combination), ``acc_generalist``, ``acc_average``; the same restricted
    to the specialists' classes on the inputs of those classes (``cond_acc...``, the paper's
    conditional accuracy); ``acc_cover{k}`` / ``acc_generalist_cover{k}`` by how many specialists
    cover the true class (Table 4); ``specialists_per_input``; ``cost`` (forward FLOPs per input
    relative to the generalist alone) and ``kl_iterations``. The full report is kept in :attr:`report`.

    Args:
        generalist_ckpt: the generalist's checkpoint.
        specialist_ckpts: specialist checkpoints (any order; each names its group).
        groups_file: the groups file the specialists were trained from; each checkpoint's classes must
            equal its group in this file.
        num_classes: linked from the DataModule (checked against the generalist); optional.
        input_shape: linked from the DataModule; optional.
        top_n: how many of the generalist's best classes activate specialists (paper: 1).
        average_top: how many of the most confident specialists the averaging alternative uses.
        max_iter: iteration cap of the KL solver.
        tol: the KL solver's stopping tolerance (nats).

    Raises:
        ValueError: a checkpoint for another group or label space, two checkpoints for one group, or a
            generalist for another number of classes.
    """

    def __init__(
        self,
        generalist_ckpt: str,
        specialist_ckpts: list[str],
        groups_file: str,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        top_n: int = 1,
        average_top: int = 1,
        max_iter: int = 500,
        tol: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generalist = _load_generalist(generalist_ckpt)
        classes = int(self.generalist.num_classes)
        if num_classes is not None and num_classes != classes:
            raise ValueError(f"`generalist_ckpt` predicts {classes} classes, but num_classes={num_classes}.")
        self.num_classes = classes
        self.input_shape = (
            tuple(input_shape) if input_shape is not None else tuple(self.generalist.input_shape)
        )
        self.groups = ClassGroups.load(groups_file, classes)
        if not specialist_ckpts:
            raise ValueError("`specialist_ckpts` is empty: give at least one specialist checkpoint.")
        specialists: list[SpecialistModule] = []
        seen: dict[int, str] = {}
        for path in specialist_ckpts:
            specialist = load_specialist(path)
            self._check_specialist(str(path), specialist, seen)
            specialists.append(specialist)
        self.specialists = nn.ModuleList(specialists)
        if not (isinstance(top_n, int) and 1 <= top_n <= classes):
            raise ValueError(f"`top_n` must be an integer in [1, {classes}], got {top_n!r}.")
        if not (isinstance(average_top, int) and average_top >= 1):
            raise ValueError(f"`average_top` must be a positive integer, got {average_top!r}.")
        self.top_n, self.average_top, self.max_iter, self.tol = top_n, average_top, max_iter, tol
        membership = torch.zeros(len(specialists), classes, dtype=torch.bool)
        for k, s in enumerate(specialists):
            membership[k, s.group_classes] = True
        self.register_buffer("membership", membership)
        self.records = nn.ModuleDict({stage: _EvalRecords() for stage in ("val", "test")})
        self.report: dict[str, Any] = {}
        self._flops: tuple[int, Tensor] | None = None

    def _check_specialist(self, path: str, specialist: SpecialistModule, seen: dict[int, str]) -> None:
        g = specialist.group
        if specialist.num_classes != self.num_classes:
            raise ValueError(
                f"`specialist_ckpts`: {path!r} was trained for {specialist.num_classes} classes, the generalist "
                f"predicts {self.num_classes}."
            )
        if not 0 <= g < len(self.groups.groups) or specialist.group_classes != self.groups.group(g):
            expected = self.groups.groups[g] if 0 <= g < len(self.groups.groups) else "not in the file"
            raise ValueError(
                f"`specialist_ckpts`: {path!r} is a specialist for group {g} with classes "
                f"{specialist.group_classes}, but group {g} of `groups_file` is {expected}: it was trained "
                "for another group or another groups file."
            )
        if g in seen:
            raise ValueError(f"`specialist_ckpts`: {seen[g]!r} and {path!r} are both for group {g}.")
        seen[g] = path

    def train(self, mode: bool = True) -> SpecialistEnsemble:
        # An evaluation module: every member stays in eval mode whatever the loops ask.
        return super().train(False)

    def configure_optimizers(self) -> None:
        return None

    def combine(self, x: Tensor) -> dict[str, Any]:
        """Everything for a batch: ``generalist``, ``kl`` and ``average`` probabilities ``(N, C)``,
        ``active`` ``(N, M)`` and the solver's ``iterations``."""
        pg = self.generalist(x).float().softmax(-1)
        active = active_specialists(pg, self.membership, self.top_n)
        outputs, groups = [], []
        for k, specialist in enumerate(self.specialists):
            rows = active[:, k].nonzero().squeeze(1)
            probs = torch.zeros(x.shape[0], specialist.num_outputs, device=pg.device)
            if rows.numel():  # run a specialist only where it is active: the paper's inference saving
                probs[rows] = specialist(x[rows]).float().softmax(-1)
            outputs.append(probs)
            groups.append(specialist.classes)
        kl = kl_combination(pg, outputs, groups, active, self.max_iter, self.tol)
        average = average_specialists(pg, outputs, groups, active, self.average_top)
        return {
            "generalist": pg,
            "kl": kl.probs,
            "average": average,
            "active": active,
            "iterations": kl.iterations,
        }

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities of the KL combination."""
        return self.combine(x)["kl"].clamp_min(torch.finfo(torch.float32).tiny).log()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        out = self.combine(batch["input"])
        return {"index": batch["index"], "probs": out["kl"], "generalist_probs": out["generalist"]}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        out = self.combine(batch["input"])
        target = batch["target"]
        union = self.membership.any(0)  # classes some specialist covers
        columns = [target]
        columns += [out[m].argmax(-1) for m in METHODS]
        columns += [out[m].masked_fill(~union, -1.0).argmax(-1) for m in METHODS]
        columns += [self.membership[:, target].sum(0)]
        rows = torch.cat([torch.stack(columns, -1), out["active"].long()], -1)
        self.records[stage].update(batch["index"], rows)
        self.log(
            f"{stage}/kl_iterations",
            float(out["iterations"]),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=target.shape[0],
        )

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _epoch_end(self, stage: str) -> None:
        rows = self.records[stage].compute()  # collective under DDP: every rank calls it
        self.records[stage].reset()
        if self.trainer.sanity_checking:
            return
        col = {name: rows[:, i] for i, name in enumerate(_COLUMNS)}
        active = rows[:, len(_COLUMNS) :].bool()
        union = self.membership.any(0)
        report = specialist_report(
            col["target"],
            {m: col[m] for m in METHODS},
            col["covered"],
            {m: col[f"cond_{m}"] for m in METHODS},
            union[col["target"]],
        )
        report.update(self.inference_cost(active))
        report["groups"] = [s.group_classes for s in self.specialists]
        self.report = report
        # Every rank holds the same gathered records, hence the same values: no further reduction.
        values: dict[str, float] = {}
        for key in ("acc", "cond_acc"):
            values[key] = report[key]["kl"]
            values |= {f"{key}_{m}": report[key][m] for m in METHODS if m != "kl"}
        for row in report["by_cover"]:
            values[f"acc_cover{row['cover']}"] = row["acc"]["kl"]
            values[f"acc_generalist_cover{row['cover']}"] = row["acc"]["generalist"]
        values |= {"specialists_per_input": report["specialists_per_input"], "cost": report["cost"]}
        for name, value in values.items():
            if not math.isnan(value):
                self.log(f"{stage}/{name}", value, prog_bar=name == "acc")

    def inference_cost(self, active: Tensor) -> dict[str, Any]:
        """Forward FLOPs per input relative to the generalist alone: ``1 + sum_m F_m P(m active) / F_g``.

        Args:
            active: ``(N, M)`` bool, which specialist ran on which input.
        """
        if self._flops is None:
            self._flops = (
                forward_flops(self.generalist.net, self.input_shape),
                torch.tensor([float(forward_flops(s.net, self.input_shape)) for s in self.specialists]),
            )
        generalist, specialists = self._flops
        rate = active.float().mean(0).cpu()
        return {
            "specialists_per_input": float(rate.sum()),
            "activation_rate": rate.tolist(),
            "flops_generalist": generalist,
            "cost": 1.0 + float((rate * specialists).sum()) / max(generalist, 1),
        }
