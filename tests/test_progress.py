import threading

import pytest

from robopt.errors import CancelledError
from robopt.progress import Progress


def test_track_reports_first_and_last_and_rate_limits():
    events = []
    progress = Progress(emit=events.append, node="n", min_interval_s=3600)
    assert list(progress.track(range(100), "loop")) == list(range(100))
    assert [(e["current"], e["total"]) for e in events] == [(0, 100), (100, 100)]


def test_cancel_raises_at_the_next_update():
    cancel = threading.Event()
    progress = Progress(cancel=cancel)
    seen = []
    with pytest.raises(CancelledError):
        for i in progress.track(range(10), "loop"):
            seen.append(i)
            if i == 3:
                cancel.set()
    assert seen == [0, 1, 2, 3]
