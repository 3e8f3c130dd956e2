"""Per-family ground-truth losses and prediction-mimicking (KD) losses.

One criterion class per head family, all sharing `DenseCriterion`'s flatten / assign / loss /
KD contract, so the training step and the distiller never branch on the family.
"""

from __future__ import annotations

from crosskd_cli.criteria.atss import ATSSCriterion
from crosskd_cli.criteria.base import DenseCriterion, FlatOutputs
from crosskd_cli.criteria.fcos import FCOSCriterion
from crosskd_cli.criteria.gfl import GFLCriterion
from crosskd_cli.criteria.retinanet import RetinaNetCriterion
from crosskd_cli.errors import ModelError
from crosskd_cli.specs import ModelSpec

CRITERIA: dict[str, type[DenseCriterion]] = {
    "gfl": GFLCriterion,
    "retinanet": RetinaNetCriterion,
    "atss": ATSSCriterion,
    "fcos": FCOSCriterion,
}


def build_criterion(spec: ModelSpec) -> DenseCriterion:
    """The ground-truth (and KD) criterion of the spec's head family."""
    if spec.family not in CRITERIA:
        raise ModelError(
            f"No training losses for head family '{spec.family}'.",
            hint=f"Use one of: {', '.join(sorted(CRITERIA))}.",
        )
    return CRITERIA[spec.family].from_spec(spec)


__all__ = ["CRITERIA", "DenseCriterion", "FlatOutputs", "build_criterion"]
