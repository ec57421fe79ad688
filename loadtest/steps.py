"""The step load schedule: (users, spawn rate, duration) steps, their text form, and the shape's `tick()`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

DEFAULT_STEPS = "1x30,2x30,4x30,8x30,16x30"
_STEP = re.compile(r"^\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*(?:@\s*(\d+(?:\.\d+)?))?\s*$")


@dataclass(frozen=True)
class Step:
    """`users` concurrent users for `duration_s` seconds, started or stopped at `spawn_rate` users per second."""

    users: int
    duration_s: float
    spawn_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_steps(text: str) -> list[Step]:
    """`USERSxSECONDS[@SPAWN_RATE],...`, e.g. `1x30,2x30,4x30@2`; the spawn rate defaults to the step's users
    (the whole step starts within a second)."""
    steps = []
    for part in text.split(","):
        match = _STEP.match(part)
        if match is None:
            raise ValueError(f"steps: {part.strip()!r} is not USERSxSECONDS[@SPAWN_RATE] (e.g. 4x30 or 4x30@2)")
        users, duration = int(match[1]), float(match[2])
        rate = float(match[3]) if match[3] else float(max(users, 1))
        if users < 1 or duration <= 0 or rate <= 0:
            raise ValueError(f"steps: {part.strip()!r} needs users >= 1, seconds > 0 and spawn rate > 0")
        steps.append(Step(users, duration, rate))
    return steps


def format_steps(steps: Sequence[Step]) -> str:
    """The text form `parse_steps` reads back."""
    return ",".join(f"{s.users}x{s.duration_s:g}@{s.spawn_rate:g}" for s in steps)


def boundaries(steps: Sequence[Step]) -> list[float]:
    """Start time of every step and the end of the last one, in seconds from the start of the test."""
    times = [0.0]
    for step in steps:
        times.append(times[-1] + step.duration_s)
    return times


def total_duration(steps: Sequence[Step]) -> float:
    return boundaries(steps)[-1]


def step_index_at(steps: Sequence[Step], t: float) -> int | None:
    """The step running `t` seconds into the test (steps are [start, end) intervals); None before 0 or after the
    last step."""
    if t < 0:
        return None
    for index, end in enumerate(boundaries(steps)[1:]):
        if t < end:
            return index
    return None


class StepTicker:
    """The step shape's `tick()`: mixed into locust's `LoadTestShape` by the locustfile (kept apart so that it can be
    tested without importing locust, which monkey-patches the process with gevent)."""

    steps: Sequence[Step] = ()

    if TYPE_CHECKING:  # provided by LoadTestShape (must not be defined here: it would shadow locust's)

        def get_run_time(self) -> float: ...

    def current_steps(self) -> Sequence[Step]:
        return self.steps

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) of the step running now; None once the last step is over, which ends the test."""
        steps = self.current_steps()
        index = step_index_at(steps, self.get_run_time())
        if index is None:
            return None
        return steps[index].users, steps[index].spawn_rate
