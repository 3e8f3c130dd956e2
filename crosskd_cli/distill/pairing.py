"""Can this student be distilled from this teacher? The checks `inspect` and `distill` share."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.distill.kd_terms import method_terms
from crosskd_cli.errors import ModelError
from crosskd_cli.families import get_family

if TYPE_CHECKING:
    from crosskd_cli.checkpoints.format import CheckpointMeta
    from crosskd_cli.config.presets import DistillConfig
    from crosskd_cli.data import CocoDetection


def tap_widths(teacher: ModelSpec, student: ModelSpec, cross_index: int) -> tuple[int, int]:
    """(teacher, student) channels of the tap at `cross_index`: the FPN's at 0, else the head's."""
    if cross_index == 0:
        return teacher.fpn_channels, student.fpn_channels
    return teacher.head_channels, student.head_channels


def pair_problems(
    teacher: ModelSpec, student: ModelSpec, cross_index: int, adapter: bool = False
) -> list[str]:
    """Every reason the cross-head forward cannot run between these two heads (empty = fine).

    With `adapter`, taps of different widths are fine: a learnable 1x1 conv bridges them.
    """
    problems = []

    def differ(what: str, t: object, s: object) -> None:
        if t != s:
            problems.append(f"{what} differ: teacher {t}, student {s}")

    differ("head families", teacher.family, student.family)
    differ("class counts", teacher.num_classes, student.num_classes)
    differ("FPN strides (levels)", list(teacher.strides), list(student.strides))
    if teacher.family == student.family:  # the same priors and box coding, as the family has them
        family = get_family(teacher.family)
        priors_t, priors_s = family.priors(teacher), family.priors(student)
        differ(f"{priors_t.kind} (base scale, scales per octave, ratios)",
               priors_t.layout()[1:4], priors_s.layout()[1:4])  # fmt: skip
        coder_t, coder_s = family.box_coder(teacher), family.box_coder(student)
        for field in dataclasses.fields(coder_t):  # e.g. GFL's reg_max
            differ(field.name, getattr(coder_t, field.name), getattr(coder_s, field.name))
    teacher_width, student_width = tap_widths(teacher, student, cross_index)
    if teacher_width != student_width and not adapter:
        problems.append(
            f"tap widths at index {cross_index} differ: teacher {teacher_width}, student "
            f"{student_width} (--set distill.adapter=true adds a learnable 1x1 adapter)"
        )
    return problems


def check_cross_index(cross_index: int, teacher: ModelSpec, student: ModelSpec) -> None:
    """The index must name a tap both heads have: 0 (the FPN feature) .. stacked_convs."""
    top = min(teacher.stacked_convs, student.stacked_convs)
    if not 0 <= cross_index <= top:
        raise ModelError(
            f"--cross-index {cross_index} is out of range: these heads have {top} tower blocks.",
            hint=f"Choose 0..{top} (0 feeds the FPN feature; the paper's default is 3).",
        )


def check_teacher_classes(
    teacher: CheckpointMeta, teacher_name: str, val: CocoDetection, data_spec: str
) -> None:
    """KD compares class scores position by position: the teacher must predict the data's
    classes, in the data's order (the training split's list, which `val` is read with: a
    validation json lacking some of them still fits)."""
    mismatch = teacher.class_mismatch(val.class_names, val.category_ids, data_spec)
    if mismatch is not None:
        raise ModelError(
            f"Teacher {teacher_name} does not fit the data: {mismatch}",
            hint="Train or import a teacher on this data set's classes first: "
            "crosskd teacher --preset NAME --data DATA",
        )


def check_pair(
    teacher: CheckpointMeta,
    teacher_name: str,
    student: ModelSpec,
    val: CocoDetection,
    data_spec: str,
    cfg: DistillConfig,
) -> None:
    """Refuse, with the reason, a pair the distillation `cfg` asks for but cannot run on this
    data. Tap widths only matter to a cross branch, and not when the adapter bridges them."""
    check_cross_index(cfg.cross_index, teacher.model, student)
    check_teacher_classes(teacher, teacher_name, val, data_spec)
    bridged = cfg.adapter or not any(term.needs_taps for term in method_terms(cfg.method))
    problems = pair_problems(teacher.model, student, cfg.cross_index, adapter=bridged)
    if problems:
        raise ModelError(
            f"Teacher {teacher_name} and the student cannot be paired: "
            + "; ".join(problems)
            + ".",
            hint="Pick a pair preset whose models match (crosskd inspect --list-presets).",
        )


# What makes a teacher the one a pair preset names: the same backbone and the same head
IDENTITY_FIELDS = ("backbone", "family", "fpn_channels", "head_channels", "stacked_convs",
                   "norm_groups")  # fmt: skip


def teacher_identity_problems(
    teacher: CheckpointMeta, expected: ModelSpec | None, expected_name: str
) -> list[str]:
    """How a teacher file differs from the teacher a pair preset names (`expected`, the
    model of its teacher preset), and whether it was trained as a student."""
    problems = []
    if teacher.kind == "student":
        problems.append(
            f"it was trained as a student (`crosskd {teacher.training.get('command', 'distill')}`"
            f" of preset '{teacher.preset}')"
        )
    if expected is not None:
        for name in IDENTITY_FIELDS:
            got, want = getattr(teacher.model, name), getattr(expected, name)
            if got != want:
                problems.append(f"its {name} is {got}, {expected_name}'s is {want}")
    return problems


def describe_teacher(teacher: CheckpointMeta, name: str) -> str:
    """The banner's line: which teacher this is (preset, backbone, data, recorded AP)."""
    ap = teacher.metrics.get("AP")
    recorded = f"recorded AP {ap:.1f}" if isinstance(ap, (int, float)) else "no recorded AP"
    return (
        f"Teacher {name}: {teacher.kind} of preset '{teacher.preset}' ({teacher.model.backbone}"
        f" {teacher.model.family}), evaluated on {teacher.val_data}, {recorded}."
    )
