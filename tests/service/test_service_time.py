"""The busy-time meter behind admission: busy wall time over cutouts answered.

A driven clock stands in for time, so each figure is exact; the meter's job is the
arithmetic of overlapping requests and idle gaps, which a real clock would blur.
"""

from __future__ import annotations

import pytest

from service.core.service_time import BusyTimeMeter


class DrivenClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_requests_count_their_busy_time_once_and_idle_gaps_not_at_all():
    clock = DrivenClock()
    meter = BusyTimeMeter(window_s=1.0, smoothing=0.5, clock=clock)
    assert meter.seconds_per_cutout is None
    clock.now += 5.0  # idle before the first request: not busy
    meter.started()
    clock.now += 0.4
    meter.started()  # overlaps the first: the same 0.4 s is not counted twice
    clock.now += 0.2
    meter.finished(10)
    assert meter.seconds_per_cutout is None  # 0.6 s of busy time: the window is still open
    clock.now += 0.4
    meter.finished(10)  # 1.0 s busy, 20 cutouts answered
    assert meter.seconds_per_cutout == pytest.approx(0.05)
    assert meter.in_progress == 0
    clock.now += 30.0  # idle again
    meter.started()
    clock.now += 1.0
    meter.finished(5)  # 1.0 s for 5 cutouts: 0.2, averaged with weight 0.5
    assert meter.seconds_per_cutout == pytest.approx(0.05 + 0.5 * (0.2 - 0.05))


def test_a_window_without_an_answer_stays_open_until_one_arrives():
    clock = DrivenClock()
    meter = BusyTimeMeter(window_s=0.5, clock=clock)
    meter.started()
    meter.started()
    clock.now += 2.0
    meter.finished(0)  # a request that held no cutout answers nothing
    assert meter.seconds_per_cutout is None
    clock.now += 1.0
    meter.finished(30)
    assert meter.seconds_per_cutout == pytest.approx(3.0 / 30)
