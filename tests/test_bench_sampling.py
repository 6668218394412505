"""The bench's /proc accounting: a process tree, its CPU time and its memory."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.compare.sampling import cpu_seconds, process_tree, pss_each, rss_bytes, rss_each


def test_the_tree_holds_the_children_and_their_memory():
    """A child started here is in this process's tree; RSS and PSS are read for each process."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert all(size > 0 for size in rss_each([os.getpid(), child.pid]))
        assert rss_bytes([os.getpid()]) == rss_each([os.getpid()])[0]
        assert len(pss_each([os.getpid()])) == 1
    finally:
        child.kill()
        child.wait()


def test_processes_gone_are_left_out():
    """A PID that no longer exists adds no CPU time and no memory line."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert rss_each([gone.pid]) == [] and cpu_seconds([gone.pid]) == 0
    assert cpu_seconds([os.getpid()]) > 0
