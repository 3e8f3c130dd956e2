"""The one check of a preset against the zoo: what the torch-free parser (`config`) cannot know.

A preset parses without torch (`crosskd --help` and a typo in a YAML key stay instant); the
names and rules that live with torch code are checked here, once, by every reader of a preset
for work (run set-up, inspect, quickstart, teacher resolution, run records), before any data
is read: the model's names (family, backbone, ImageNet file) and cross-field rules (the model
factory's), and the method string (the KD-term table's).
"""

from __future__ import annotations

from crosskd_cli.config.presets import Preset, read_preset
from crosskd_cli.config.schema import PRESET
from crosskd_cli.distill.kd_terms import parse_method
from crosskd_cli.errors import ModelError, PresetError
from crosskd_cli.models.build import check_model_names, check_spec


def check_preset(preset: Preset) -> Preset:
    """`preset`, once its model and method fit the zoo; errors name where it was read from."""
    where = preset.source or f"preset '{preset.name}'"
    check_model_names(preset.model, where=where, policy=PRESET)
    try:
        parse_method(preset.distill.method)
    except PresetError as err:
        raise PresetError(f"{where}: {err.message}", hint=err.hint) from None
    try:
        check_spec(preset.model)
    except ModelError as err:
        raise ModelError(f"{where}: {err.message}", hint=err.hint) from None
    return preset


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> Preset:
    """A shipped preset by name or a YAML file by path, `key=value` overrides applied, read
    and checked (`config.read_preset`, then `check_preset`)."""
    return check_preset(read_preset(name_or_path, overrides))
