"""What the trainer reports: throughput over its log intervals, and the strict JSON result line."""

import json

import pytest

from braid.train.log import Throughput
from braid.train.result import print_result


def test_tokens_per_s_is_total_tokens_over_total_time_after_the_first_interval():
    t = Throughput()
    assert t.tokens_per_s() == 0.0
    assert t.add(1000, 10.0) == 100.0  # the first interval: start-up included
    assert t.tokens_per_s() == 100.0  # the only one so far, so it counts
    assert t.add(1000, 1.0) == 1000.0
    assert t.add(1000, 3.0) == pytest.approx(333.33, abs=0.01)
    # 2000 tokens in 4 s; the mean of the two rates would be 666.7
    assert t.tokens_per_s() == 500.0


def test_result_line_is_strict_json_with_null_for_non_finite_numbers(capsys):
    print("a log line first")
    print_result(
        {
            "steps": 3,
            "final_train_loss": float("nan"),
            "mfu": None,
            "nested": {"a": [float("inf"), -float("inf"), 1.5]},
        }
    )
    last = capsys.readouterr().out.splitlines()[-1]

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(last, parse_constant=refuse) == {
        "steps": 3,
        "final_train_loss": None,
        "mfu": None,
        "nested": {"a": [None, None, 1.5]},
    }
