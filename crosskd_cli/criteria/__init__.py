"""Per-family ground-truth losses and prediction-mimicking (KD) losses.

One criterion class per head family, all sharing `DenseCriterion`'s flatten / assign / loss /
KD contract, so the training step and the distiller never branch on the family. The family
table (`crosskd_cli.families`) builds them.
"""

from __future__ import annotations

from crosskd_cli.criteria.atss import ATSSCriterion
from crosskd_cli.criteria.base import DenseCriterion, FlatOutputs
from crosskd_cli.criteria.fcos import FCOSCriterion
from crosskd_cli.criteria.gfl import GFLCriterion
from crosskd_cli.criteria.retinanet import RetinaNetCriterion

__all__ = [
    "ATSSCriterion",
    "DenseCriterion",
    "FCOSCriterion",
    "FlatOutputs",
    "GFLCriterion",
    "RetinaNetCriterion",
]
