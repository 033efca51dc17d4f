"""Hand-checked Wilcoxon signed-rank p-values and Bonferroni adjustment for samatch.stats.

Exact null distribution for n pairs: each of the 2**n sign patterns of the ranks is equally likely;
two-sided p = 2 * P(W <= w_observed). With n = 6 all-positive differences only 1 of 64 patterns has
W- = 0, so p = 2 / 64 = 0.03125.
"""

import math
import warnings

import pytest

from samatch.stats import Comparison, compare_runs, format_table

REF = {f"case{i}": 10.0 * i for i in range(1, 7)}  # 10, 20, ..., 60


def _run(diffs, ref=REF):
    return {case: value + d for (case, value), d in zip(ref.items(), diffs, strict=True)}


CASES = [
    # (differences run - ref, zero_method, statistic, p)
    ([1, 2, 3, 4, 5, 6], "wilcox", 0.0, 2 / 64),
    # rank 1 negative: patterns with W- <= 1 are {} and {1} -> 2 * 2 / 64
    ([-1, 2, 3, 4, 5, 6], "wilcox", 1.0, 4 / 64),
    # rank 2 negative: W- <= 2 from {}, {1}, {2} -> 2 * 3 / 64
    ([1, -2, 3, 4, 5, 6], "wilcox", 2.0, 6 / 64),
    # alternating signs: W+ = 9; 27 of the 64 subsets of {1..6} sum to <= 9 -> 2 * 27 / 64
    ([1, -2, 3, -4, 5, -6], "wilcox", 9.0, 54 / 64),
    # tied differences (1, 1): exhaustive permutation test, still 1 extreme pattern in 64
    ([1, 1, 2, 3, 4, 5], "wilcox", 0.0, 2 / 64),
]


@pytest.mark.parametrize("diffs,zero_method,statistic,p", CASES)
def test_compare_runs_exact_p(diffs, zero_method, statistic, p):
    (row,) = compare_runs({"ref": REF, "new": _run(diffs)}, "ref", zero_method=zero_method)
    assert row.run == "new" and row.n == 6
    assert row.statistic == pytest.approx(statistic)
    assert row.p == pytest.approx(p)
    assert row.p_bonferroni == pytest.approx(p)  # one comparison: unchanged
    assert row.ref_mean == pytest.approx(35.0)
    assert row.diff == pytest.approx(sum(diffs) / 6)
    assert row.mean == pytest.approx(35.0 + sum(diffs) / 6)


ZERO_CASES = [
    # one zero difference among seven pairs; every method leaves 1 extreme pattern of the 6 nonzero signs
    ("wilcox", 0.0, 2 / 64),  # zero dropped: n = 6, W- = 0
    ("pratt", 0.0, 2 / 64),  # zero ranked (rank 1) then dropped: W- = 0
    ("zsplit", 0.5, 2 / 64),  # zero's rank 1 split: W- = 0.5
]


@pytest.mark.parametrize("zero_method,statistic,p", ZERO_CASES)
def test_zero_differences(zero_method, statistic, p):
    ref = {**REF, "case7": 70.0}
    run = {**_run([1, 2, 3, 4, 5, 6]), "case7": 70.0}
    (row,) = compare_runs({"ref": ref, "new": run}, "ref", zero_method=zero_method)
    assert row.n == 7
    assert row.statistic == pytest.approx(statistic)
    assert row.p == pytest.approx(p)


def test_all_differences_zero_gives_p_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy would warn about a division by zero here
        (row,) = compare_runs({"ref": REF, "same": dict(REF)}, "ref")
    assert (row.statistic, row.p, row.p_bonferroni, row.diff) == (0.0, 1.0, 1.0, 0.0)


def test_small_n_is_exact():
    # n = 5 all positive: 2 / 32, the smallest two-sided p reachable with 5 pairs
    ref = {k: REF[k] for k in list(REF)[:5]}
    (row,) = compare_runs({"ref": ref, "new": _run([1, 2, 3, 4, 5], ref)}, "ref")
    assert row.p == pytest.approx(2 / 32)


def test_bonferroni_over_comparisons_and_cap():
    per_case = {"a": _run([1, 2, 3, 4, 5, 6]), "ref": REF, "b": _run([1, -2, 3, -4, 5, -6])}
    a, b = compare_runs(per_case, "ref")
    assert [a.run, b.run] == ["a", "b"]  # per_case order, reference left out
    assert a.p == pytest.approx(0.03125) and a.p_bonferroni == pytest.approx(0.0625)
    assert b.p == pytest.approx(54 / 64) and b.p_bonferroni == 1.0  # 2 * 0.84375 capped


def test_pairs_only_common_cases():
    # the run misses case6 and has an extra case: 5 pairs, extra ignored in means too
    run = {**{k: v for k, v in _run([1, 2, 3, 4, 5, 6]).items() if k != "case6"}, "extra": 1000.0}
    (row,) = compare_runs({"ref": REF, "new": run}, "ref")
    assert row.n == 5
    assert row.ref_mean == pytest.approx(30.0) and row.mean == pytest.approx(33.0)
    assert row.p == pytest.approx(2 / 32)


def test_no_common_cases_gives_nan():
    (row,) = compare_runs({"ref": REF, "new": {"other": 1.0}}, "ref")
    assert row.n == 0
    assert all(math.isnan(x) for x in (row.mean, row.diff, row.statistic, row.p, row.p_bonferroni))


def test_format_table():
    rows = [Comparison("unimatch", 6, 0.85, 0.8, 0.05, 0.0, 0.03125, 0.0625)]
    expected = (
        "run       n    mean  ref_mean     diff  W        p  p_bonf\n"
        "unimatch  6  0.8500    0.8000  +0.0500  0  0.03125  0.0625"
    )
    assert format_table(rows) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [({"reference": "missing"}, "reference"), ({"reference": "ref", "zero_method": "drop"}, "zero_method")],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_runs({"ref": REF, "new": _run([1, 2, 3, 4, 5, 6])}, **kwargs)


def test_pairs_are_patients_over_the_cases_both_runs_have():
    # Prepare: p1 has two frames (ED, ES), p2 one case, and a row without a patient (an older
    # cases.csv) is its own patient. Values as CSV strings, as the reader gives them.
    rows = [
        {"case": "p1_ED", "patient": "p1", "class": "1", "dice": "0.2"},
        {"case": "p1_ED", "patient": "p1", "class": "2", "dice": "0.4"},  # ED mean 0.3
        {"case": "p1_ES", "patient": "p1", "class": "1", "dice": "0.5"},
        {"case": "p1_ES", "patient": "p1", "class": "2", "dice": "0.9"},  # ES mean 0.7
        {"case": "p2_ED", "patient": "p2", "class": "1", "dice": "1.0"},
        {"case": "p2_ED", "patient": "p2", "class": "2", "dice": "0.0"},  # 0.5
        {"case": "old", "class": "1", "dice": "0.8"},
    ]
    from samatch.stats import case_means, patients_of

    # Execute
    ref = case_means(rows, "dice")
    groups = patients_of(rows)
    better = {case: v + 0.1 for case, v in ref.items()}
    partial = {"p1_ED": 0.3, "p2_ED": 0.5, "old": 0.8}  # p1's ES frame missing; equal elsewhere
    by_patient, same_volumes = compare_runs({"ref": ref, "a": better, "b": partial}, "ref", groups=groups)

    # Assert: 4 cases -> 3 patients, p1 = (0.3 + 0.7) / 2 = 0.5; the run missing p1_ES is paired with
    # the reference's p1_ED alone, so it equals the reference (not 0.3 against 0.5)
    assert ref == pytest.approx({"p1_ED": 0.3, "p1_ES": 0.7, "p2_ED": 0.5, "old": 0.8})
    assert groups == {"p1_ED": "p1", "p1_ES": "p1", "p2_ED": "p2", "old": "old"}
    assert by_patient.n == 3 and by_patient.ref_mean == pytest.approx((0.5 + 0.5 + 0.8) / 3)
    assert by_patient.diff == pytest.approx(0.1)
    assert same_volumes.n == 3 and same_volumes.diff == pytest.approx(0.0) and same_volumes.p == 1.0
    assert compare_runs({"ref": ref, "a": better}, "ref")[0].n == 4  # no groups: every case a pair
