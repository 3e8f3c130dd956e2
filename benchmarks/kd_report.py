"""Read the kd_effect result files and write the table (Markdown + JSON) and the bar plot.

Pure bookkeeping, no torch: every figure comes from the per-run JSON files that
`kd_effect.py` writes after evaluating each run with `crosskd eval`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("AP", "AP50", "AP75", "APs")
BASELINE = "none"


@dataclass(frozen=True)
class Row:
    """One method (at one cross index) over its seeds."""

    label: str
    method: str
    cross_index: int | None
    kd_on: str  # both, cls or reg
    seeds: list[int]
    values: dict[str, list[float]]  # metric -> one value per seed, in `seeds` order

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values[metric])

    def std(self, metric: str) -> float | None:
        """Sample standard deviation across seeds; None with a single seed."""
        values = self.values[metric]
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class PairedDifference:
    """AP of a method minus AP of a reference, seed by seed, on the seeds both have."""

    label: str
    reference: str
    seeds: list[int]
    differences: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else None

    @property
    def resolved(self) -> bool:
        """Told apart by the seeds: at least 3 pairs, all of one sign, |mean| > 2 std errors."""
        n = len(self.differences)
        if n < 3 or self.std is None:
            return False
        same_sign = all(d > 0 for d in self.differences) or all(d < 0 for d in self.differences)
        return same_sign and abs(self.mean) > 2 * self.std / math.sqrt(n)


def label_of(method: str, cross_index: int | None, kd_on: str = "both") -> str:
    """`crosskd i=3`, `crosskd+pkd i=3`, `mimic`, `none`, `crosskd i=3 (cls KD only)`."""
    label = method if cross_index is None else f"{method} i={cross_index}"
    return label if kd_on == "both" else f"{label} ({kd_on} KD only)"


def load_results(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the teacher's result or None, every student result), read from `folder`/*.json."""
    teacher, students = None, []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("role") == "teacher":
            teacher = result
        elif result.get("role") == "student":
            students.append(result)
    return teacher, students


def group_rows(students: list[dict[str, Any]]) -> list[Row]:
    """One Row per (method, cross index), seeds sorted."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for result in students:
        key = (result["method"], result["cross_index"], result.get("kd_on", "both"))
        groups.setdefault(key, []).append(result)
    rows = []
    for (method, index, kd_on), results in groups.items():
        results.sort(key=lambda r: r["seed"])
        rows.append(
            Row(
                label_of(method, index, kd_on),
                method,
                index,
                kd_on,
                [r["seed"] for r in results],
                {m: [float(r["metrics"][m]) for r in results] for m in METRICS},
            )
        )
    order = ["none", "mimic", "pkd", "crosskd", "crosskd+pkd", "crosskd+mimic"]
    branches = ["both", "cls", "reg"]
    rows.sort(
        key=lambda r: (
            branches.index(r.kd_on),
            order.index(r.method) if r.method in order else 99,
            -1 if r.cross_index is None else r.cross_index,
        )
    )
    return rows


def paired_difference(row: Row, reference: Row, metric: str = "AP") -> PairedDifference | None:
    """row - reference on their shared seeds, or None when they share none."""
    shared = [s for s in row.seeds if s in reference.seeds]
    if not shared or row is reference:
        return None
    differences = [
        row.values[metric][row.seeds.index(s)] - reference.values[metric][reference.seeds.index(s)]
        for s in shared
    ]
    return PairedDifference(row.label, reference.label, shared, differences)


def summarise(teacher: dict[str, Any] | None, rows: list[Row]) -> dict[str, Any]:
    """Everything the Markdown table and the plot show, as plain JSON-ready data."""
    by_label = {r.label: r for r in rows}
    baseline = by_label.get(BASELINE)
    references = [r for r in (baseline, by_label.get("mimic")) if r is not None]
    teacher_ap = teacher["metrics"]["AP"] if teacher else None
    summary_rows = []
    for row in rows:
        entry: dict[str, Any] = {
            "label": row.label,
            "method": row.method,
            "cross_index": row.cross_index,
            "seeds": row.seeds,
        }
        for metric in METRICS:
            entry[metric] = {
                "mean": round(row.mean(metric), 2),
                "std": None if row.std(metric) is None else round(row.std(metric), 2),
                "per_seed": row.values[metric],
            }
        entry["paired_ap_differences"] = {}
        for reference in references:
            diff = paired_difference(row, reference)
            if diff is not None:
                entry["paired_ap_differences"][reference.label] = {
                    "seeds": diff.seeds,
                    "per_seed": [round(d, 2) for d in diff.differences],
                    "mean": round(diff.mean, 2),
                    "std": None if diff.std is None else round(diff.std, 2),
                    "resolved": diff.resolved,
                }
        if teacher_ap is not None and baseline is not None and row is not baseline:
            gap = teacher_ap - baseline.mean("AP")
            if gap > 0:
                entry["teacher_gap_closed"] = round((row.mean("AP") - baseline.mean("AP")) / gap, 3)
        summary_rows.append(entry)
    return {
        "teacher": None if teacher is None else {"AP": teacher_ap, **teacher["metrics"]},
        "rows": summary_rows,
    }


def _mean_std(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.1f}" + (f" ± {cell['std']:.1f}" if cell["std"] is not None else "")


def _difference(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    text = f"{cell['mean']:+.1f}"
    if cell["std"] is not None:
        text += f" ± {cell['std']:.1f}" + (" (resolved)" if cell["resolved"] else " (unresolved)")
    return text


def markdown(summary: dict[str, Any], context: dict[str, Any]) -> str:
    """The README-ready table: mean ± std over seeds, paired differences, gap closed."""
    lines = [
        f"Teacher {context.get('teacher_label', '')}: AP "
        + (f"{summary['teacher']['AP']:.1f}" if summary["teacher"] else "not measured"),
        "",
        "| student | seeds | AP | AP50 | AP75 | APs | ΔAP vs none (paired) "
        "| ΔAP vs mimic (paired) | gap closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        diffs = row["paired_ap_differences"]
        closed = row.get("teacher_gap_closed")
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | "
            + " | ".join(_mean_std(row[m]) for m in METRICS)
            + f" | {_difference(diffs.get(BASELINE))} | {_difference(diffs.get('mimic'))} | "
            + ("" if closed is None else f"{closed:.0%}")
            + " |"
        )
    lines += [
        "",
        "± is the sample standard deviation over seeds. A paired difference compares runs with "
        "the same seed (same initialisation and data order); it is *resolved* when at least 3 "
        "seeds agree in sign and its mean exceeds twice its standard error. *Gap closed* = "
        "(AP − AP of none) / (teacher AP − AP of none).",
    ]
    if summary.get("students_of_another_teacher"):
        lines += [
            "",
            "**Trained from another teacher checkpoint than the one measured above:** "
            + ", ".join(summary["students_of_another_teacher"]),
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Bar plot of mean AP per student (error bars: std over seeds), teacher and baseline lines."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("The bar plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [r["label"] for r in rows]
    means = [r["AP"]["mean"] for r in rows]
    errors = [r["AP"]["std"] or 0.0 for r in rows]
    palette = {"none": "#888888", "mimic": "#d08c30", "pkd": "#4a9a50", "crosskd+mimic": "#8a5ab0"}
    colours = [palette.get(r["method"], "#3070b0") for r in rows]  # crosskd, crosskd+pkd: blue
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4.0))
    ax.bar(range(len(rows)), means, yerr=errors, color=colours, capsize=3)
    if summary["teacher"]:
        ax.axhline(summary["teacher"]["AP"], color="black", linestyle="--", label="teacher")
    baseline = next((r for r in rows if r["method"] == "none"), None)
    if baseline:
        ax.axhline(baseline["AP"]["mean"], color="#888888", linestyle=":", label="none")
    low = min(means + ([summary["teacher"]["AP"]] if summary["teacher"] else [])) - 3
    ax.set_ylim(bottom=max(0.0, low))
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def teacher_mismatch(teacher: dict[str, Any] | None, students: list[dict[str, Any]]) -> list[str]:
    """Students trained from another teacher than the recorded one (a retrained teacher)."""
    if teacher is None:
        return []
    return sorted(
        s["label"] + f" s{s['seed']}"
        for s in students
        if s.get("teacher_sha256") != teacher.get("checkpoint_sha256")
    )


def write_report(results: Path, out: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Write kd_effect.md, kd_effect.json and kd_effect.png into `out`; returns the summary."""
    teacher, students = load_results(results)
    summary = summarise(teacher, group_rows(students))
    summary["students_of_another_teacher"] = teacher_mismatch(teacher, students)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_effect.json").write_text(json.dumps({**context, **summary}, indent=2) + "\n")
    (out / "kd_effect.md").write_text(markdown(summary, context))
    if summary["rows"]:
        plot(summary, out / "kd_effect.png", context.get("title", "kd_effect"))
    return summary
