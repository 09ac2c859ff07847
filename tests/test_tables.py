"""The shared fixed-width table renderer, checked against tables written out by hand."""

from __future__ import annotations

import pytest

from bnsurgery.tables import render_table


def test_left_aligned_with_rule_and_ragged_last_column():
    lines = render_table(("step", "status", "detail"),
                         [("build", "done", "random weights"), ("fuse BatchNorm", "ok", "")])
    assert lines == ["step            status  detail",
                     "--------------  ------  ------",
                     "build           done    random weights",
                     "fuse BatchNorm  ok"]


def test_padded_last_column_gets_a_full_rule():
    lines = render_table(("a", "b"), [("xyz", "long cell")], pad_last=True)
    assert lines == ["a    b", "---  ---------", "xyz  long cell"]


def test_right_alignment_indent_gap_and_no_rule():
    lines = render_table(("name", "ms"), [("fused", "1.5"), ("original", "12.0")],
                         align="lr", rule=False, gap=" | ", indent="  ")
    assert lines == ["  name     |   ms", "  fused    |  1.5", "  original | 12.0"]


def test_every_line_is_as_wide_as_its_columns():
    rows = [(str(i) * i, "x" * (5 - i), "tail") for i in range(1, 5)]
    lines = render_table(("c1", "c2", "c3"), rows)
    starts = {line.index("tail") for line in lines[2:]}
    assert starts == {len("4444") + 2 + len("xxxx") + 2}  # the widest cell of each column


def test_bad_rows_and_alignment_are_refused():
    with pytest.raises(ValueError, match=r"row 1 has 1 cells .* expected 2"):
        render_table(("a", "b"), [("only one",)])
    with pytest.raises(ValueError, match=r"align='lx' is not one 'l' or 'r' per column"):
        render_table(("a", "b"), [], align="lx")
