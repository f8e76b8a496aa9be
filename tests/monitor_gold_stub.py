"""A gold function for the monitor tests: eval i (in call order) scores every row `VALUES[i]`."""

from __future__ import annotations

VALUES: list[float] = []
calls = 0


def gold(responses, labels):
    global calls
    value = VALUES[min(calls, len(VALUES) - 1)]
    calls += 1
    return [value] * len(responses)


def reset(values: list[float]) -> None:
    global calls
    VALUES[:] = values
    calls = 0
