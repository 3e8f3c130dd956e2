"""Checkpoints of older crosskd versions: their key names, mapped onto today's when loading.

crosskd 0.1.x named the head's towers `cls_tower` / `reg_tower` and its predictors as
MMDetection does (`gfl_cls`, `retina_reg`, `conv_centerness`, ...); since 0.2.0 the towers are
`towers.cls` / `towers.reg` and the predictors `cls_predictor`, `box_predictor` and
`centerness_predictor` in every family. Only names change; every tensor loads as it was saved.
Their metadata lacks the model spec's later `backbone_init`, which only says how a backbone
was initialised before training, not what it is: it reads as `scratch`, as they had no other.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from crosskd_cli.families import get_family

_TOWER = re.compile(r"^head\.(cls|reg)_tower\.")


def upgrade_keys(state: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """`state` with 0.1.x head key names renamed to today's (others untouched)."""
    predictors = {theirs: ours for ours, theirs in get_family(family).mmdet_predictors.items()}

    def rename(key: str) -> str:
        key = _TOWER.sub(r"head.towers.\1.", key)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "head" and parts[1] in predictors:
            parts[1] = predictors[parts[1]]
        return ".".join(parts)

    return {rename(key): value for key, value in state.items()}


# ModelSpec fields added after 0.2.0 that describe training, not the architecture, with the
# value every older file implies; architecture fields are never guessed (schema.METADATA)
LATER_MODEL_FIELDS = {"backbone_init": "scratch"}


def upgrade_meta(data: Any) -> Any:
    """Checkpoint metadata (plain JSON data) with the model spec's later fields filled in."""
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = {**data, "model": {**LATER_MODEL_FIELDS, **data["model"]}}
    return data
