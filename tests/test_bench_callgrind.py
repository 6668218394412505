"""Reading callgrind's dumps (captured from a real ``callgrind_control --dump``, in
tests/data/bench/callgrind/): the instructions counted while instrumentation was on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.compare.callgrind import by_object, latest_dump, parse_totals, valgrind_argv

DUMPS = Path(__file__).parent / "data" / "bench" / "callgrind"


def test_the_totals_line_is_read_not_the_summary():
    """A dump triggered by callgrind_control has ``summary: 0`` up top; ``totals:`` at the end
    holds the instructions executed while instrumentation was on."""
    text = (DUMPS / "callgrind.out.1").read_text()
    assert "summary: 0" in text
    assert parse_totals(text) == 52101


def test_a_dump_without_totals_gives_none():
    """Something that is not a dump is not counted as zero instructions."""
    assert parse_totals("# callgrind format\nevents: Ir\n") is None


def test_the_newest_numbered_dump_is_read(tmp_path):
    """callgrind_control numbers its dumps (``.1``, ``.2``); the newest is the one just asked
    for, while the unnumbered file is the end-of-process dump (totals 0 here)."""
    out = tmp_path / "callgrind.out"
    shutil.copy(DUMPS / "callgrind.out", out)
    assert latest_dump(out) is None
    shutil.copy(DUMPS / "callgrind.out.1", tmp_path / "callgrind.out.2")
    (tmp_path / "callgrind.out.1").write_text("totals: 1\n")
    os.utime(tmp_path / "callgrind.out.1", (1, 1))
    newest = latest_dump(out)
    assert newest is not None and newest == tmp_path / "callgrind.out.2"
    assert parse_totals(newest.read_text()) == 52101
    assert parse_totals(out.read_text()) == 0


def test_instrumentation_starts_off():
    """Startup and warm-up are not counted: callgrind starts with instrumentation off."""
    argv = valgrind_argv(Path("/w/callgrind.out"))
    assert argv[:2] == ["valgrind", "--tool=callgrind"]
    assert "--instr-atstart=no" in argv and "--callgrind-out-file=/w/callgrind.out" in argv


def test_instructions_by_shared_object_add_up_to_the_totals():
    """Self cost per shared object: the inclusive cost lines after ``calls=`` are the callee's
    and are skipped, so the objects' shares sum to exactly the dump's total, and known
    libraries get their readable name."""
    text = (DUMPS / "callgrind.out.1").read_text()
    spent = by_object(text)
    assert sum(spent.values()) == parse_totals(text) == 52101
    assert spent == {"dash": 35863, "libc": 16238}
