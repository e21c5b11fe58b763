"""The maths of combining a generalist with its specialists (Hinton, Vinyals & Dean 2015, section 5.3).

At inference the generalist picks its top-``n`` classes (:func:`active_specialists`), the specialists
whose groups meet them are run, and the full distribution ``q`` minimising
``KL(p_g || q) + sum_m KL(p_m || fold_m(q))`` combines them (:func:`kl_combination`; ``fold_m``,
:func:`fold_to_group`, sums ``q``'s mass outside group ``m`` into its dustbin). The simple alternative
averages the most confident specialists (:func:`average_specialists`), and :func:`specialist_report`
scores predictors overall, conditionally and by coverage (the paper's Tables 3 and 4).

Pure, typed functions of tensors: no Lightning, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


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
