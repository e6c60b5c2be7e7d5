"""The attention benchmark's pure helpers (batch per length, memory estimates, skip rule, table and summary lines)."""

from __future__ import annotations

import pytest

from tests.workers import script

bench = script("bench_attention")


def shape(length: int, tokens: int = 65536, heads: int = 16, head_dim: int = 128):
    return bench.Shape(bench.batch_for(length, tokens), length, heads, head_dim)


def test_batch_keeps_tokens_per_call_constant():
    assert [bench.batch_for(n, 65536) for n in (1024, 4096, 16384, 65536)] == [64, 16, 4, 1]
    assert bench.batch_for(131072, 65536) == 1  # longer than the token budget: one row
    assert bench.batch_for(3000, 65536) == 21  # rounds down


@pytest.mark.parametrize(
    "estimate,length,measured_gib",
    [
        ("math_work_gib", 1024, 0.277),
        ("math_work_gib", 4096, 4.109),
        ("chunked_work_gib", 1024, 0.150),
        ("chunked_work_gib", 4096, 0.596),
        ("chunked_work_gib", 16384, 2.380),
    ],
)
def test_estimates_track_measured_peaks(estimate, length, measured_gib):
    """Peaks of an H100 run at batch 1, 16 heads of 128 (benchmarks/RESULTS.md): the estimate is within 10% above."""
    got = getattr(bench, estimate)(bench.Shape(1, length, 16, 128))
    assert measured_gib <= got <= 1.1 * measured_gib


def test_default_budget_keeps_math_only_where_it_fits():
    """At 64k tokens per call MATH's n x n scores fit 20 GiB at 1k only; the chunked linear form fits everywhere."""
    lengths = (1024, 4096, 16384, 65536)
    math = [bench.skip_reason(bench.math_work_gib, shape(n), 20) for n in lengths]
    assert math[0] is None and all(r is not None and "--max-gib 20" in r for r in math[1:])
    assert all(bench.skip_reason(bench.chunked_work_gib, shape(n), 20) is None for n in lengths)
    assert bench.skip_reason(None, shape(65536), 1e-9) is None  # flash-style rows are never skipped


def rows_for_two_lengths():
    Row = bench.Row
    return [
        Row(1024, 64, "sdpa forced CUDNN_ATTENTION", "softmax", "forced", 1.0, 4.0, 0.1),
        Row(1024, 64, "sdpa forced MATH", "softmax", "forced", 9.0, 30.0, 18.0),
        Row(1024, 64, "attend auto (-> sdpa)", "softmax", "auto", 1.02, 4.1, 0.1),
        Row(1024, 64, "fla chunk_simple_gla direct", "linear", "direct", 2.0, 6.0, 0.5),
        Row(1024, 64, "linear ours, fla (fla_chunk_bthd)", "linear", "ours_fla", 2.1, 6.1, 0.5),
        Row(4096, 16, "sdpa forced CUDNN_ATTENTION", "softmax", "forced", 4.0, 16.0, 0.1),
        Row(4096, 16, "sdpa forced MATH", "softmax", "forced", note="skipped: estimated 67.0 GiB > --max-gib 20"),
        Row(4096, 16, "attend auto (-> sdpa)", "softmax", "auto", 4.4, 17.0, 0.1),
        Row(4096, 16, "fla chunk_simple_gla direct", "linear", "direct", 2.0, 6.0, 0.5),
        Row(4096, 16, "linear ours, fla (fla_chunk_bthd)", "linear", "ours_fla", 2.6, 6.2, 0.5),
    ]


def test_table_shows_batch_and_why_a_row_is_empty():
    lines = bench.format_table(rows_for_two_lengths())
    assert lines[0].startswith("| length | batch | implementation |") and len(lines) == 12
    assert lines[8] == (
        "| 4096 | 16 | sdpa forced MATH | n/a | n/a | n/a | skipped: estimated 67.0 GiB > --max-gib 20 |"
    )


def test_summary_lines_ignore_skipped_rows():
    rows = rows_for_two_lengths()
    ratios = bench.ratios_line(rows).split(" | ")
    assert "T=1024: auto/fastest forced 1.02 (1.02)" in ratios[0] and ratios[0].endswith("ok")
    assert "auto/fastest forced 1.06 (1.10)" in ratios[1] and "[sdpa forced CUDNN_ATTENTION] MISSED" in ratios[1]
    assert "ours-fla/fla-direct 1.03 (1.30) MISSED" in ratios[1]
    assert "from T=4096 on" in bench.crossover_line(rows)  # linear 6.2 ms beats softmax 16 ms at 4k, not 4 ms at 1k
