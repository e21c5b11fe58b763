"""Members evaluated in worker processes (kd_lightning.parallel): the outputs equal the sequential loop's, a
member's error or a worker's death surfaces as a WorkerError naming it, the shares and the cost model, and
the tiny benchmark (kd_lightning.workflows.parallel_benchmark, scripts/benchmark_parallel_ensemble.py)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from kd_lightning.ensemble import Ensemble, combine_logits
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.parallel import CostModel, MemberPool, WorkerError, assign_members, run_members
from kd_lightning.workflows import parallel_benchmark as pb

# "fork": a worker starts in milliseconds (spawn re-imports torch and Lightning, seconds per worker); the
# code a worker runs is the same. The default, spawn, runs in test_spawned_workers_give_the_same_outputs.
FORK = "fork"


class Boom(nn.Module):
    """A member that raises on inputs with a negative first entry."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < 0).any()):
            raise ValueError("boom: negative input")
        return x


class Dies(nn.Module):
    """A member whose process exits at its first forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os._exit(3)


def members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        MLP((8,), 5, hidden=(16,)).eval(),
        MLP((8,), 3, hidden=(4,)).eval(),
        nn.Linear(8, 5).eval(),
        MLP((8,), 5, hidden=(32, 8)).eval(),
    ]


def test_parallel_outputs_equal_the_sequential_loop():
    nets = members()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    rows = [None, torch.tensor([3, 1, 7]), torch.tensor([], dtype=torch.long), torch.arange(0, 40, 2)]
    expected_all, expected_rows = run_members(nets, x), run_members(nets, x, rows)
    assert expected_rows[2] is None and expected_rows[1].shape == (3, 3)
    for workers in (1, 2, 3):
        with MemberPool(nets, workers, start_method=FORK) as pool:
            assert sorted(k for share in pool.assignment for k in share) == [0, 1, 2, 3]
            for _ in range(2):  # the second batch reuses the shared buffer
                outputs = pool.run(x)
                assert all(torch.equal(a, b) for a, b in zip(outputs, expected_all, strict=True))
            outputs = pool.run(x, rows)
            assert outputs[2] is None
            assert all(
                torch.equal(a, b)
                for a, b in zip(outputs[:2] + outputs[3:], expected_rows[:2] + expected_rows[3:], strict=True)
            )
            smaller = pool.run(x[:5])  # another shape: a new buffer
            assert torch.equal(smaller[0], run_members(nets[:1], x[:5])[0])


def test_an_ensemble_combined_from_parallel_members_is_the_ensemble():
    nets = [SmallCNN((1, 12, 12), 4, channels=(4, 8), head=8).eval() for _ in range(3)]
    ensemble = Ensemble(members=nets, input_shape=(1, 12, 12))
    x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with MemberPool(nets, 2, start_method=FORK) as pool, torch.no_grad():
        logits = ensemble.member_logits(x, pool)
        assert torch.equal(logits, ensemble.member_logits(x))
        assert torch.equal(combine_logits(logits, ensemble.rule), ensemble(x))


@pytest.mark.slow
def test_spawned_workers_give_the_same_outputs():
    nets = members()
    x = torch.randn(10, 8)
    with MemberPool(nets, 2) as pool:  # the default start method, spawn
        outputs = pool.run(x)
    assert all(torch.equal(a, b) for a, b in zip(outputs, run_members(nets, x), strict=True))


def test_a_members_error_names_the_worker_and_members_and_the_pool_goes_on():
    nets = [nn.Identity(), Boom(), nn.Identity()]
    with MemberPool(nets, 2, start_method=FORK) as pool:
        bad = torch.full((4, 3), -1.0)
        with pytest.raises(
            WorkerError, match=r"worker 1, members \[1\] on a batch of shape \(4, 3\)"
        ) as caught:
            pool.run(bad)
        assert "ValueError: boom: negative input" in str(caught.value)  # the worker's traceback
        good = torch.ones(4, 3)
        assert all(torch.equal(o, good) for o in pool.run(good))  # every worker answered: still in step


def test_a_dead_worker_is_reported_and_closes_the_pool():
    pool = MemberPool([nn.Identity(), Dies()], 2, start_method=FORK)
    with pytest.raises(WorkerError, match=r"worker 1 \(members \[1\]\) died \(exit code 3\)"):
        pool.run(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(torch.ones(2, 2))
    pool.close()  # closing twice is harmless


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="`members` is empty"):
        MemberPool([], 1, start_method=FORK)
    with pytest.raises(ValueError, match=r"`workers` must be an integer in \[1, 2\]"):
        MemberPool([nn.Identity(), nn.Identity()], 3, start_method=FORK)
    with pytest.raises(ValueError, match="one device per worker"):
        MemberPool([nn.Identity(), nn.Identity()], 2, devices=["cpu"], start_method=FORK)
    with pytest.raises(ValueError, match="one entry per member"):
        run_members([nn.Identity()], torch.ones(1, 1), [None, None])


def test_shares_balance_the_cost_and_the_model_fits_its_own_predictions():
    assert assign_members([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3, 4, 5]]
    assert assign_members([1.0, 1.0, 1.0], 3) == [[0], [1], [2]]
    truth = CostModel([0.004, 0.003, 0.002, 0.001], a=0.0005, b=0.0002)
    fitted = CostModel.fit(truth.member_seconds, {w: truth.predict(w) for w in (1, 2, 3)})
    # Exact data, three points, two parameters: recovered to float64 rounding of millisecond sums.
    eps = torch.finfo(torch.float64).eps
    assert fitted.a == pytest.approx(truth.a, abs=64 * eps) and fitted.b == pytest.approx(
        truth.b, abs=64 * eps
    )
    assert truth.compute(2) == pytest.approx(0.005)  # {0.004, 0.001} and {0.003, 0.002}
    # An overhead falling with the number of workers is not physical: b is held at 0.
    falling = CostModel.fit([0.001, 0.001], {1: 0.010, 2: 0.005})
    assert falling.b == 0.0 and falling.a == pytest.approx((0.008 + 0.004) / 2)  # compute 2 ms, then 1 ms


def test_tiny_benchmark_prints_one_table_with_measured_and_predicted_rows():
    results = pb.run_benchmark(pb.BenchmarkSettings.tiny())
    (result,) = results
    assert sorted(result.timing.parallel) == [1, 2] and result.timing.sequential > 0
    assert [row["workers"] for row in result.rows] == [1, 2, 3]
    assert result.rows[2]["measured_ms"] is None and result.rows[2]["model_ms"] > 0
    lines = pb.format_table(results).splitlines()
    assert lines[0] == "| " + " | ".join(pb.COLUMNS) + " |"
    body = [line for line in lines[2:] if line.startswith("| tiny |")]
    assert len(body) == 3 and all(len(line.strip("|").split(" | ")) == len(pb.COLUMNS) for line in body)
    assert lines[-1].startswith("tiny: latency(W) = max over workers of its members' compute +")
