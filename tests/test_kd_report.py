"""The kd_effect benchmark's arithmetic: paired differences, their verdict, the gap closed."""

from __future__ import annotations

import json

import pytest

from benchmarks.kd_effect import Run, plan
from benchmarks.kd_report import PairedDifference, write_report


def student(method, index, seed, ap, teacher="t1"):
    metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 10}
    label = method if index is None else f"{method} i={index}"
    return {
        "role": "student",
        "label": label,
        "method": method,
        "cross_index": index,
        "seed": seed,
        "metrics": metrics,
        "teacher_sha256": teacher,
    }


def write(folder, name, result):
    (folder / f"{name}.json").write_text(json.dumps(result))


def test_the_plan_pairs_three_methods_over_seeds_and_sweeps_the_index_once():
    runs = plan(seeds=3)
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 3 * 3 + 4 + 3 + 4
    assert {"none-s2", "mimic-s2", "crosskd-i3-s2", "crosskd-i0-s0", "crosskd-i4-s0"} <= set(names)
    assert Run("crosskd+pkd", 3, 0).name == "crosskd-pkd-i3-s0"
    assert Run("pkd", None, 0).group == "pkd"


def test_paired_differences_use_only_shared_seeds_and_say_whether_seeds_resolve_them(tmp_path):
    write(
        tmp_path, "teacher", {"role": "teacher", "metrics": {"AP": 40.0}, "checkpoint_sha256": "t1"}
    )
    for seed, (none_ap, cross_ap, mimic_ap) in enumerate(
        [(30, 33, 31), (31, 33.5, 30.5), (29, 32.6, 30)]
    ):
        write(tmp_path, f"none-s{seed}", student("none", None, seed, none_ap))
        write(tmp_path, f"crosskd-i3-s{seed}", student("crosskd", 3, seed, cross_ap))
        write(tmp_path, f"mimic-s{seed}", student("mimic", None, seed, mimic_ap))
    write(tmp_path, "crosskd-i0-s0", student("crosskd", 0, 0, 32.0, teacher="t2"))

    summary = write_report(tmp_path, tmp_path, {"title": "t"})

    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["none", "mimic", "crosskd i=0", "crosskd i=3"]
    cross = rows["crosskd i=3"]
    assert cross["AP"]["mean"] == pytest.approx(33.03, abs=0.01)
    vs_none = cross["paired_ap_differences"]["none"]
    assert vs_none["per_seed"] == [3.0, 2.5, 3.6] and vs_none["resolved"] is True
    vs_mimic = rows["mimic"]["paired_ap_differences"]["none"]
    assert vs_mimic["per_seed"] == [1.0, -0.5, 1.0] and vs_mimic["resolved"] is False
    # one seed: a difference, never a verdict
    assert rows["crosskd i=0"]["paired_ap_differences"]["none"]["std"] is None
    assert cross["teacher_gap_closed"] == pytest.approx((33.033 - 30) / (40 - 30), abs=1e-3)
    assert summary["students_of_another_teacher"] == ["crosskd i=0 s0"]
    table = (tmp_path / "kd_effect.md").read_text()
    assert "| crosskd i=3 | 3 | 33.0 ± 0.5 |" in table and "+3.0 ± 0.6 (resolved)" in table
    assert (tmp_path / "kd_effect.png").stat().st_size > 0


def test_two_seeds_or_mixed_signs_are_never_resolved():
    assert not PairedDifference("a", "b", [0, 1], [2.0, 2.1]).resolved
    assert not PairedDifference("a", "b", [0, 1, 2], [2.0, 2.1, -0.1]).resolved
    assert PairedDifference("a", "b", [0, 1, 2], [-2.0, -2.1, -1.9]).resolved


def test_kd_on_one_branch_is_its_own_row_after_the_full_methods(tmp_path):
    write(tmp_path, "none-s0", student("none", None, 0, 30.0))
    write(tmp_path, "crosskd-i3-s0", student("crosskd", 3, 0, 33.0))
    cls_only = {**student("crosskd", 3, 0, 31.5), "kd_on": "cls"}
    write(tmp_path, "crosskd-i3-cls-s0", cls_only)
    assert Run("crosskd", 3, 0, "cls").name == "crosskd-i3-cls-s0"

    summary = write_report(tmp_path, tmp_path, {"title": "t"})

    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["none", "crosskd i=3", "crosskd i=3 (cls KD only)"]
    assert summary["rows"][2]["paired_ap_differences"]["none"]["per_seed"] == [1.5]
