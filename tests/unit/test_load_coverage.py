"""The load helper's coverage check, on hand-made reports: "0 failed requests" counts only for a load that saw the
event from before it began until after the service was whole again."""

from __future__ import annotations

import pytest

from tests.support.load import LoadReport, Outcome


def report(times: list[float], started_at: float = 0.5, ended_by_itself_at: float | None = None) -> LoadReport:
    return LoadReport([Outcome(t, "/predict", 200) for t in times], 10.0, started_at, ended_by_itself_at)


def test_a_load_around_the_whole_event_covers_it() -> None:
    assert report([1, 2, 3, 4, 5, 6]).covers(2.5, 4.5) == 2


@pytest.mark.parametrize(
    ("load", "says"),
    [
        (report([3, 4, 5], started_at=2.9), "started after the event"),
        (report([2.6, 4.6], started_at=1), "no request answered before"),
        (report([1, 2, 5, 6]), "no request answered during"),
        (report([1, 2, 3, 4]), "no request after"),
        (report([1, 2, 3, 5], ended_by_itself_at=4.0), "stopped by itself"),
    ],
)
def test_a_load_that_missed_part_of_the_event_fails(load: LoadReport, says: str) -> None:
    with pytest.raises(AssertionError, match=says):
        load.covers(2.5, 4.5)
