"""The server's listens at a fleet's relay: spares rest while idle (server/spare_listens.py); a refused one backs off."""

from __future__ import annotations

import threading
import time

from ptth_lib.server.spare_listens import SpareListens


def resting(spare: SpareListens, index: int) -> threading.Thread:
    thread = threading.Thread(target=spare.rest_if_idle, args=(index,), daemon=True)
    thread.start()
    return thread


def test_the_first_listen_never_rests_nor_a_busy_servers_spares() -> None:
    spare = SpareListens(threading.Event(), idle_after_secs=60)
    started = time.monotonic()
    spare.rest_if_idle(0)
    spare.rest_if_idle(1)  # work within the minute (the start counts as such)
    assert time.monotonic() - started < 0.5


def test_an_idle_servers_spare_rests_until_work_comes() -> None:
    spare = SpareListens(threading.Event(), idle_after_secs=0.05)
    time.sleep(0.1)
    first = resting(spare, 0)
    first.join(1)
    assert not first.is_alive()  # the first returns at once
    thread = resting(spare, 1)
    thread.join(0.3)
    assert thread.is_alive()  # resting
    spare.work_came()
    thread.join(1)
    assert not thread.is_alive()
    spare.rest_if_idle(1)  # busy again: no rest


def test_a_stop_ends_a_rest() -> None:
    stop = threading.Event()
    spare = SpareListens(stop, idle_after_secs=0)
    thread = resting(spare, 1)
    thread.join(0.2)
    assert thread.is_alive()
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_a_refused_listen_waits_about_its_retry_after_with_jitter() -> None:
    """A full relay's 503 says Retry-After: 5; a fleet it refused comes back spread over 2.5-5 s, then later."""
    from ptth_lib.errors import BACKOFF_CAP_SECS, backoff_secs, retry_after_secs

    assert retry_after_secs({"Retry-After": "5"}) == 5.0
    assert retry_after_secs({}) == 0.0 == retry_after_secs({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"})
    first = [backoff_secs(0, 5.0) for _ in range(1000)]
    assert 2.5 <= min(first) < 2.7 and 4.8 < max(first) <= 5.0  # spread, not all at once
    assert 0.25 <= backoff_secs(0) <= 0.5  # without one, as before
    assert backoff_secs(10, 5.0) > 5.0 and backoff_secs(20, 600.0) <= BACKOFF_CAP_SECS
