"""KD terms: the pieces a method string combines (`crosskd+pkd`), one small object each.

A term owns its token in method strings, the loss names it logs, the weight keys it reads
(`distill.<key>_weight`, else the head family's default, else its own) and whether the step
must record the tower taps for it. `KD_TERMS` is the one table; a method string is parsed
against it once, when the preset loads. Adding a method is a term here (or in its own module)
plus one entry in the table (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.criteria import DenseCriterion, FlatOutputs
from crosskd_cli.detection.losses import pkd_loss
from crosskd_cli.detection.structures import DetectorOutput
from crosskd_cli.detection.targets import DenseTargets
from crosskd_cli.errors import PresetError, closest

if TYPE_CHECKING:
    from crosskd_cli.distill.distiller import Distiller, TapStats

NONE = "none"  # the method without any KD term: the plain student


@dataclass
class StepOutputs:
    """What one distillation step computed before its KD terms, shared by all of them."""

    student: DetectorOutput  # with the taps at the cross index when a term needs them
    teacher: DetectorOutput  # computed under no_grad; FPN features only for a term needing them
    teacher_tap_stats: dict[str, list[TapStats]]  # of the teacher's taps, when a term needs taps
    student_flat: FlatOutputs  # the student's own predictions, flattened once
    teacher_flat: FlatOutputs | None  # None when no term needs the teacher's head
    targets: DenseTargets  # the student's assignment (label weights, positives, normalisers)
    image_sizes: list[tuple[int, int]]


class KDTerm(ABC):
    """One distillation term. `__call__` returns {loss name: weighted, normalised loss}."""

    token: str  # its name in a method string
    weight_keys: tuple[str, ...] = ()  # reads distill.<key>_weight
    defaults: Mapping[str, float] = {}  # weights for keys the head family does not define
    needs_taps: bool = False  # the step records both heads' taps at the cross index
    needs_teacher_head: bool = True  # False: the teacher's FPN features are enough (PKD)
    needs_teacher_features: bool = False  # reads the teacher's FPN features (else dropped)

    @abstractmethod
    def loss_names(self, criterion: DenseCriterion, cfg: DistillConfig) -> tuple[str, ...]:
        """The names `__call__` returns under `cfg` (watched for staying at exactly zero)."""

    @abstractmethod
    def __call__(self, distiller: Distiller, out: StepOutputs) -> dict[str, Tensor]: ...


class CrossHead(KDTerm):
    """CrossKD (docs/method.md §2-§3): the student's taps through the rest of the teacher's
    head; those cross-head predictions get the family's KD losses against the teacher's."""

    token = "crosskd"
    weight_keys = ("cls", "box", "centerness")
    needs_taps = True

    def loss_names(self, criterion: DenseCriterion, cfg: DistillConfig) -> tuple[str, ...]:
        return criterion.kd_names(cfg, "kd_cross")

    def __call__(self, distiller: Distiller, out: StepOutputs) -> dict[str, Tensor]:
        cross = distiller.cross_head_forward(out.student.head.taps, out.teacher_tap_stats)
        cross_flat = distiller.criterion.flatten(cross, out.image_sizes)
        return distiller.prediction_kd(cross_flat, out, "kd_cross")


class Mimic(KDTerm):
    """Prediction mimicking: the same KD losses on the student's own predictions (the paper's
    i = n case; not LD, which selects regions and a temperature of its own)."""

    token = "mimic"
    weight_keys = ("cls", "box", "centerness")

    def loss_names(self, criterion: DenseCriterion, cfg: DistillConfig) -> tuple[str, ...]:
        return criterion.kd_names(cfg, "kd_mimic")

    def __call__(self, distiller: Distiller, out: StepOutputs) -> dict[str, Tensor]:
        return distiller.prediction_kd(out.student_flat, out, "kd_mimic")


class PKD(KDTerm):
    """Feature imitation (PKD, docs/method.md §3.7) between the two FPNs, level by level."""

    token = "pkd"
    weight_keys = ("pkd",)
    needs_teacher_head = False
    needs_teacher_features = True

    def loss_names(self, criterion: DenseCriterion, cfg: DistillConfig) -> tuple[str, ...]:
        return ("kd_pkd",)

    def __call__(self, distiller: Distiller, out: StepOutputs) -> dict[str, Tensor]:
        loss = pkd_loss(out.student.features, out.teacher.features)
        return {"kd_pkd": distiller.weights["pkd"] * loss}


# token -> term, in the order their losses are computed and summed
KD_TERMS: dict[str, KDTerm] = {term.token: term for term in (CrossHead(), Mimic(), PKD())}


def parse_method(method: str) -> tuple[str, ...]:
    """`crosskd+pkd` -> ("crosskd", "pkd"), in the table's order; `none` -> (). A token that is
    not a term raises PresetError naming it, with the closest term."""
    if method == NONE:
        return ()
    tokens = [token.strip() for token in method.split("+")]
    for token in tokens:
        if token not in KD_TERMS:
            close = closest(token, [*KD_TERMS, NONE])
            hint = f"Did you mean '{close}'? " if close else ""
            raise PresetError(
                f"Method '{method}': '{token}' is not a KD term.",
                hint=f"{hint}Combine {', '.join(KD_TERMS)} with '+' (e.g. crosskd+pkd), "
                f"or use '{NONE}' for the plain student.",
            )
    if len(set(tokens)) != len(tokens):
        raise PresetError(f"Method '{method}' names a term twice.", hint="Name each term once.")
    return tuple(token for token in KD_TERMS if token in tokens)


def method_terms(method: str) -> list[KDTerm]:
    return [KD_TERMS[token] for token in parse_method(method)]


def weight_fields(cfg: DistillConfig) -> dict[str, float | None]:
    """{key: distill.<key>_weight} for every loss weight the config can set (numbers or
    None = default; `region_weight` names a kind of weighting, not a loss weight)."""
    fields = [f.name for f in dataclasses.fields(cfg) if f.name.endswith("_weight")]
    return {
        name.removesuffix("_weight"): getattr(cfg, name)
        for name in fields
        if getattr(cfg, name) is None or isinstance(getattr(cfg, name), (int, float))
    }


def kd_weights(
    cfg: DistillConfig, family_defaults: Mapping[str, float], terms: list[KDTerm] | None = None
) -> dict[str, float]:
    """Every weight key of `cfg` and of `terms`: the config's value, else the family's
    default, else the term's own."""
    given = weight_fields(cfg)
    own: dict[str, Any] = {}
    for term in terms or []:
        own.update({key: term.defaults.get(key) for key in term.weight_keys})
    weights = {}
    for key in [*given, *(k for k in own if k not in given)]:
        value = given.get(key)
        if value is None:
            value = family_defaults.get(key, own.get(key))
        if value is None:
            raise PresetError(
                f"No weight for the KD term key '{key}': neither set nor defaulted.",
                hint=f"Set it with --set distill.{key}_weight=VALUE",
            )
        weights[key] = float(value)
    return weights


def resolve_distill(cfg: DistillConfig, family_defaults: Mapping[str, float]) -> DistillConfig:
    """The config with every weight field filled in (what a run records in config.yaml)."""
    weights = kd_weights(cfg, family_defaults)
    return dataclasses.replace(cfg, **{f"{key}_weight": weights[key] for key in weight_fields(cfg)})
