"""pytest plugin used by gpu_check.sh: time limits per test without pytest-timeout, and a record that
survives the process.

The GPU machine's image may lack pytest-timeout, and a step killed from outside leaves no junit file. So:
- every test gets a soft limit (SIGALRM: the test fails with GuardTimeout and the run goes on) and a hard
  one (faulthandler's watchdog thread, which needs no GIL: it dumps every thread's stack into
  RECORDS.stacks.txt and exits the process; a kernel that never returns blocks the main thread inside C,
  where no signal handler can run; pytest's capture would swallow a dump to stderr);
- a test is not started when the step's deadline is closer than GPU_GUARD_MIN_START_S: it is skipped with
  a reason saying so, and pytest ends normally, junit file and all;
- each test's start and end are appended to a JSON-lines file as they happen: a test that started and
  never ended is the one that hung or crashed the process, and GPU_GUARD_RESUME=1 deselects every test
  already recorded, so gpu_check.sh can rerun the rest after it.

Environment (all optional except the records file):
    GPU_GUARD_RECORDS      path of the JSON-lines file (appended to)
    GPU_GUARD_TEST_S       soft limit per test, seconds (default 60)
    GPU_GUARD_HARD_S       extra seconds after the soft limit before the process is ended (default 20)
    GPU_GUARD_DEADLINE     epoch seconds at which the step's time is up (default: none)
    GPU_GUARD_MIN_START_S  do not start a test closer than this to the deadline (default 5)
    GPU_GUARD_RESUME       1: skip (deselect) the tests already in the records file

Load with `python -m pytest -p gpu_check_guard` with benchmarks/ on PYTHONPATH.
"""
import faulthandler
import json
import os
import signal
import time

import pytest

# The records' reader is shared with the report (same folder, no pytest dependency there).
from gpu_check_report import read_records


class GuardTimeout(Exception):
    """A test ran past its soft time limit."""


def _env_float(name, default):
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a number of seconds, got {raw!r}") from None


def _short(text, limit=300):
    """The first assertion/error line of a failure report, else its last line, cut to `limit` chars."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    pick = next((ln for ln in lines if ln.startswith("E ")), lines[-1])
    pick = pick[1:].strip() if pick.startswith("E ") else pick.strip()
    return pick[:limit]


class Guard:
    def __init__(self, path):
        self.path = path
        self.test_s = _env_float("GPU_GUARD_TEST_S", 60.0)
        self.hard_s = _env_float("GPU_GUARD_HARD_S", 20.0)
        self.deadline = _env_float("GPU_GUARD_DEADLINE", float("inf"))
        self.min_start_s = _env_float("GPU_GUARD_MIN_START_S", 5.0)
        if self.test_s <= 0 or self.hard_s <= 0:
            raise pytest.UsageError(f"GPU_GUARD_TEST_S and GPU_GUARD_HARD_S must be > 0, got "
                                    f"{self.test_s} and {self.hard_s}")
        self.resume = os.environ.get("GPU_GUARD_RESUME", "0") == "1"
        self.seen = {r["id"] for r in read_records(path) if "id" in r} if self.resume else set()
        self.outcome = {}
        self.file = open(path, "a", buffering=1)  # line-buffered: each record is on disk when written
        self.stacks = open(path + ".stacks.txt", "a", buffering=1)
        faulthandler.enable(file=self.stacks, all_threads=True)  # a crash in C still shows the test's stack

    def _write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not self.seen:
            return
        keep = [it for it in items if it.nodeid not in self.seen]
        dropped = [it for it in items if it.nodeid in self.seen]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep

    def _alarm(self, signum, frame):
        raise GuardTimeout(f"gpu_check guard: test ran past its {self._soft:.0f} s limit")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        left = self.deadline - time.time()
        self._soft = max(1.0, min(self.test_s, left - self.min_start_s / 2))
        self._late = left < self.min_start_s
        self.outcome[item.nodeid] = ("passed", "")
        self._write(ev="start", id=item.nodeid, t=round(time.time(), 3), limit_s=round(self._soft, 1))
        t0 = time.time()
        old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self._soft)
        self.stacks.write(f"--- {item.nodeid}\n")
        faulthandler.dump_traceback_later(self._soft + self.hard_s, exit=True, file=self.stacks)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            faulthandler.cancel_dump_traceback_later()
        outcome, msg = self.outcome.pop(item.nodeid)
        self._write(ev="end", id=item.nodeid, outcome=outcome, secs=round(time.time() - t0, 3), msg=msg)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if self._late:
            pytest.skip("gpu_check guard: not started, the step's time was up")

    def pytest_runtest_logreport(self, report):
        prev, _ = self.outcome.get(report.nodeid, ("passed", ""))
        if report.failed and prev != "failed":
            where = "" if report.when == "call" else f"[{report.when}] "
            self.outcome[report.nodeid] = ("failed", where + _short(report.longreprtext))
        elif report.skipped and prev == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else _short(report.longreprtext)
            self.outcome[report.nodeid] = ("skipped", str(reason)[:300])

    def pytest_unconfigure(self, config):
        faulthandler.disable()
        self.file.close()
        self.stacks.close()


def pytest_configure(config):
    path = os.environ.get("GPU_GUARD_RECORDS", "")
    if not path:
        raise pytest.UsageError("gpu_check_guard needs GPU_GUARD_RECORDS (the JSON-lines file to append to)")
    config.pluginmanager.register(Guard(path), "gpu_check_guard_instance")
