"""Fault injector: a process whose wall clock is ``CREDPROXY_TEST_CLOCK_SKEW_S`` seconds off
(``time.time`` only; monotonic time is untouched), put on ``PYTHONPATH`` by a test that needs a
sidecar with a skewed clock (e.g. its client assertions are already expired at the IdP)."""

import os
import time

_skew_s = float(os.environ.get("CREDPROXY_TEST_CLOCK_SKEW_S", "0"))
if _skew_s:
    _wall = time.time
    time.time = lambda: _wall() + _skew_s
