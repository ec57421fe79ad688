"""The step schedule: its text form and the shape's tick() over time."""

from __future__ import annotations

import pytest

from loadtest.steps import (
    DEFAULT_STEPS,
    Step,
    StepTicker,
    boundaries,
    format_steps,
    parse_steps,
    step_index_at,
    total_duration,
)


def test_parse_steps_defaults_spawn_rate_to_users():
    assert parse_steps("1x30, 4x10.5@2") == [Step(1, 30.0, 1.0), Step(4, 10.5, 2.0)]
    assert parse_steps(format_steps(parse_steps(DEFAULT_STEPS))) == parse_steps(DEFAULT_STEPS)
    assert [s.users for s in parse_steps(DEFAULT_STEPS)] == [1, 2, 4, 8, 16]
    assert total_duration(parse_steps(DEFAULT_STEPS)) == 150.0


@pytest.mark.parametrize("text", ["", "4", "4x", "0x10", "4x0", "4x10@0", "ax10", "4x10,"])
def test_parse_steps_rejects_bad_text(text):
    with pytest.raises(ValueError, match="steps"):
        parse_steps(text)


def test_step_index_at_half_open_intervals():
    steps = parse_steps("1x10,2x5")
    assert boundaries(steps) == [0.0, 10.0, 15.0]
    assert [step_index_at(steps, t) for t in (-0.1, 0.0, 9.99, 10.0, 14.9, 15.0)] == [None, 0, 0, 1, 1, None]


class Clock(StepTicker):
    """The shape's tick() with a run time the test sets (locust's LoadTestShape supplies get_run_time)."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps, self.now = steps, 0.0

    def get_run_time(self) -> float:
        return self.now


def test_tick_sequence_ends_with_none():
    shape = Clock(parse_steps("1x2,2x2,4x2@1"))
    ticks = []
    for t in range(8):
        shape.now = float(t)
        ticks.append(shape.tick())
    assert ticks == [(1, 1.0), (1, 1.0), (2, 2.0), (2, 2.0), (4, 1.0), (4, 1.0), None, None]


def test_tick_with_monkeypatched_run_time(monkeypatch):
    shape = StepTicker()
    monkeypatch.setattr(shape, "steps", parse_steps("3x5"), raising=False)
    monkeypatch.setattr(shape, "get_run_time", lambda: 4.9, raising=False)
    assert shape.tick() == (3, 3.0)
    monkeypatch.setattr(shape, "get_run_time", lambda: 5.0, raising=False)
    assert shape.tick() is None
