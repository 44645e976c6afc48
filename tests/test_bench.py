"""The arithmetic the benchmarks report (their timings are not tested: performance is measured in bench/)."""

import pytest

from bench.train import ceiling


def test_ceiling_of_a_step_by_hand():
    # a step at 20% of the peak, half of its time in matmuls: the matmuls run at 40% while they run; 40% overall
    # needs the step twice as fast, i.e. every other op free
    bound = ceiling(of_peak=0.2, matmul_share=0.5, target=0.4)
    assert bound == pytest.approx({"matmul_rate": 0.4, "step_time_left": 0.5, "non_matmul_left": 0.0})
    # at 30% with 60% of the time in matmuls: 40% needs the step at 3/4 of its time, the rest at 3/8 of its time
    assert ceiling(0.3, 0.6, 0.4)["non_matmul_left"] == pytest.approx((0.75 - 0.6) / 0.4)
