"""bench_overhead's start-cost rows, from a run's metrics history."""

from __future__ import annotations

import math

from simulations.bench_overhead import start_costs


def test_start_costs_are_round_zero_evaluation_and_round_one_beyond_the_median_round():
    history = [
        {"round": 0, "central_eval_seconds": 1.5},
        {"round": 1, "round_seconds": 12.0, "central_eval_seconds": 0.0},
        {"round": 2, "round_seconds": 9.0, "central_eval_seconds": 1.0},  # 8 s bare
        {"round": 3, "round_seconds": 7.0},
        {"round": 4, "round_seconds": 11.0, "clinic_evaluate_seconds": 1.5,
         "central_eval_seconds": 1.5},  # 8 s bare
    ]
    assert start_costs(history) == (1.5, 4.0)
    r0, r1 = start_costs(history[:2])  # a 1-round run has no later round to compare with
    assert r0 == 1.5 and math.isnan(r1)
