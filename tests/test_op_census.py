"""benchmarks/op_census.py: operators per step by part, with the GPU's settings, counted on the CPU."""

from __future__ import annotations

import torch

from benchmarks.op_census import PartCount, census
from samatch.prompts import _largest_component


def test_part_count_by_hand():
    counter = PartCount()
    x = torch.ones(3)
    with counter:
        x + x  # one add, in "rest"
        with counter.part("inner"):
            (x * 2).sum()  # mul and sum
        counter.wrap(torch.neg, "wrapped")(x)  # neg
    assert counter.counts == {"rest": 1, "inner": 2, "wrapped": 1}


def test_fixed_largest_component_runs_every_iteration_and_the_cpu_stops_early():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 2:4, 2:4] = True  # one component: converged after the first iteration

    def ops(iters, stop_early):
        counter = PartCount()
        with counter:
            out = _largest_component(masks, max_iters=iters, stop_early=stop_early)
        assert torch.equal(out, masks)
        return counter.counts["rest"]

    # Fixed count (a GPU): every iteration adds the same operators. CPU: it stops at the fixed point.
    per_iteration = ops(10, False) - ops(9, False)
    assert per_iteration > 0 and ops(10, False) == ops(1, False) + 9 * per_iteration
    assert ops(10, True) < ops(3, False)


def test_census_splits_a_step_into_its_parts():
    uni, sam = census("unimatch", 32, 2), census("samatch", 32, 2)
    for row in (uni, sam):
        assert sum(row["parts"].values()) == row["total"]
    # UniMatch has no SAM parts; SAM-Match adds them, and its decoder runs twice per step.
    assert set(uni["parts"]) == {"rest", "backward", "optimizers"}
    # Fused optimizer kernels: a few operators per optimizer, not one or more per tensor (130 before).
    assert uni["parts"]["optimizers"] < 5 and sam["parts"]["optimizers"] < 10
    assert {
        "SAM decoder: two-way",
        "SAM decoder: upscaling",
        "SAM prompt encoder",
        "largest component",
    } <= set(sam["parts"])
    assert sam["total"] > 3 * uni["total"]
