"""pytest plugin of scripts/gpu_check.sh (`-p gpu_check_plugin`, scripts/ on PYTHONPATH): a time
limit per test and a progress log that survives a kill.

GPU_CHECK_TEST_TIMEOUT (seconds, default 60): a test still running then fails with TimeoutError
(SIGALRM: this interrupts Python code and waits that return to it; a kernel that never returns
is left to the step's own `timeout`, and the log shows which test it was).
GPU_CHECK_PROGRESS (a file): each test's START, its outcome and END with its duration, appended
and fsync'ed line by line, so that the log of a killed run ends at the test that hung.
"""
import os
import signal
import time

import pytest

TIMEOUT = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT", "60"))
PROGRESS = os.environ.get("GPU_CHECK_PROGRESS")


def log(line):
    if not PROGRESS:
        return
    with open(PROGRESS, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _timed_out(signum, frame):
    raise TimeoutError(f"gpu_check: test exceeded its {TIMEOUT:g} s limit (GPU_CHECK_TEST_TIMEOUT)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    log(f"START {item.nodeid}")
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _timed_out)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        log(f"END {item.nodeid} {time.monotonic() - start:.1f}s")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        log(f"{report.outcome.upper()} {report.nodeid} ({report.when})")
