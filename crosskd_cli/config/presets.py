"""Presets: YAML files -> typed, frozen dataclasses, with strict validation and `--set` overrides.

No torch here, and nothing of the package but the parser and errors, so `crosskd --help` and
preset errors stay instant. The checks that ask the model zoo or the KD-term table (a head
family's name, the method string) are `preset_checks.check_preset`, which every reader of a
preset for work runs (`preset_checks.load_preset` reads and checks).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.safe_read import Unbounded, load_yaml
from crosskd_cli.config.schema import (
    PRESET,
    Count,
    Fraction,
    Index,
    NonNegative,
    Positive,
    Range,
    Side,
    parse,
    to_plain,
)
from crosskd_cli.errors import PresetError, closest, first_line

DEFAULT_PAIR = "gfl-r101-to-r50"  # what distill and inspect use when no --preset is given
DEFAULT_TEACHER = "gfl-r101"  # the default pair's teacher preset: `crosskd teacher`'s default

to_dict = to_plain  # the name training, inspect and run records import
MAX_PRESET_BYTES = 1 << 20  # the largest shipped preset is 2 KB


@dataclass(frozen=True)
class DataConfig:
    """How images are fed; where they come from is `--data` (or `source` for built-in presets)."""

    source: str | None = None  # default --data, e.g. "builtin:shapes" for CPU presets
    scale: tuple[Side, Side] = (1333, 800)  # keep-ratio resize to fit (long side, short side)
    flip_prob: Fraction = 0.5  # horizontal flip probability while training
    # Multi-scale training: each training image's short-side limit drawn from [low, high]
    # (the long-side limit stays scale's), e.g. [480, 800]; None = the single `scale`
    train_short_sides: tuple[Side, Side] | None = None
    # How the short side is drawn from train_short_sides: range = any integer in [low, high]
    # (MMDetection's RandomResize); choice = low or high (RandomChoiceResize: FCOS ms-640-800)
    multiscale: Literal["range", "choice"] = "range"
    # Batch training images of one orientation (landscape or portrait), as MMDetection's
    # AspectRatioBatchSampler: less padding, so less memory and time per step
    group_by_aspect_ratio: bool = True
    num_workers: Index = 2  # DataLoader worker processes
    skip_bad_images: bool = False  # skip unreadable images (counted) instead of stopping


@dataclass(frozen=True)
class TrainConfig:
    """The schedule of docs/method.md §4 (MMDetection's 1x by default)."""

    epochs: Count = 12  # training length in epochs, unless max_iters is set
    max_iters: Count | None = None  # train for exactly this many iterations instead of epochs
    batch_size: Count = 2  # images per process
    # forwards whose gradients are summed into one optimizer step (an iteration): the total
    # batch is processes x batch_size x grad_accum, and the lr follows it
    grad_accum: Count = 1
    # sgd (with momentum) or adamw (MMDetection's Swin configs)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Positive = 0.01  # learning rate for a total batch of base_batch_size
    base_batch_size: Count = 16  # lr scales linearly with the total batch / this
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9  # SGD momentum, in [0, 1)
    weight_decay: NonNegative = 1e-4
    warmup_iters: Index = 500  # warm-up length in iterations
    warmup_ratio: Fraction = 0.001  # warm-up starts at lr * this
    # linear (ramp from warmup_ratio) or constant (FCOS: lr * ratio)
    warmup: Literal["linear", "constant"] = "linear"
    bias_lr_factor: NonNegative = 1.0  # lr x this for conv/linear biases (FCOS: 2)
    bias_decay_factor: NonNegative = 1.0  # weight decay x this for those biases (FCOS: 0)
    # x gamma after each milestone: epochs (under max_iters, in proportion to the run: 8 of
    # 12 epochs decays after 8/12 of it), or iterations with milestone_unit=iterations
    milestones: tuple[Count, ...] = (8, 11)
    milestone_unit: Literal["epochs", "iterations"] = "epochs"
    gamma: Positive = 0.1
    grad_clip: Positive | None = None  # max gradient norm, None = no clipping
    eval_interval: Index = 0  # evaluate every N epochs (0 = only at the end)
    eval_batch_size: Count = 8  # per process; speed only (AP does not depend on it); recorded
    # no, fp16, bf16, or auto: bf16 where the device runs it natively (a GPU with bf16, a CPU
    # with AVX512-BF16/AMX), fp32 elsewhere. The training step only; evaluation stays fp32.
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # model initialisation and data order
    # Iterations between loss syncs: each writes a record to RUN/log.jsonl (and the trackers),
    # and a plain line when the output is not a terminal (logs, nohup, Slurm)
    log_interval: Count = 10
    # Experiment trackers through Accelerate, e.g. [tensorboard] or [wandb] (their packages:
    # pip install 'crosskd-cli[tensorboard]'); logs go to RUN/trackers/
    log_with: tuple[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml",
                            "dvclive"], ...] = ()  # fmt: skip
    # Save the resumable state every N iterations within an epoch too (0: at epoch ends only),
    # so a kill mid-epoch loses at most N iterations; SIGTERM and Ctrl-C save at once
    state_interval: Index = 500
    # A step whose loss (or gradient norm) is NaN/inf is skipped; this many in a row stop the
    # run with the term named (checked at log intervals)
    max_nonfinite_steps: Count = 20
    # The faster training step of crosskd_cli.models.fast_step: a folded copy of the frozen
    # teacher and, on CPUs, channels-last activations and weights (benchmarks/speed.py). The
    # same function rounded differently; false gives the plain step (tests comparing runs bit
    # for bit or across batch splits use it)
    fast_step: bool = True
    # Seconds a process waits for the others at a collective (gradient sync, loss sums) while
    # training, before the run stops with the last saved state: a process that died or hangs
    # ends the run instead of leaving the rest waiting
    collective_timeout: Count = 1800


@dataclass(frozen=True)
class DistillConfig:
    """CrossKD and the baselines it is compared with (docs/method.md §2-§3)."""

    # KD terms joined by '+' (crosskd, mimic, pkd; e.g. crosskd+pkd), or none: the plain
    # student. Checked against crosskd_cli.distill.kd_terms.KD_TERMS when the preset loads.
    method: str = "crosskd"
    cross_index: Index = 3  # student tap index fed to the teacher head, 0..stacked_convs
    # qfl (paper Eq. 7), bce (Table 11) or none (Table 3: reg only)
    cls_kd: Literal["qfl", "bce", "none"] = "qfl"
    box_kd: bool = True  # False: KD on classification only (Table 3)
    align: bool = True  # standardise the student tap to the teacher tap's statistics
    # soft (teacher max class prob) or hard (GT foreground)
    region_weight: Literal["soft", "hard"] = "soft"
    # A learnable 1x1 conv per tower maps the student tap to the teacher's width when the heads
    # differ in width; it trains with the student and is never exported.
    adapter: bool = False
    # Loss weights; None = the head family's default (crosskd_cli.families, docs/method.md §3)
    cls_weight: NonNegative | None = None
    box_weight: NonNegative | None = None
    centerness_weight: NonNegative | None = None  # ATSS centerness KD
    pkd_weight: NonNegative | None = None
    beta: NonNegative = 1.0  # modulating exponent of the QFL-style cls KD
    temperature: Positive = 1.0  # KL box KD temperature
    # The paper's Fig. 5 at every epoch end: mean L1 distances of the student's predictions to
    # the teacher's and to the ground truth on the first N validation images, in results.csv
    # and RUN/prediction_gap.png (0 = off). Measures only: the run learns exactly the same.
    gap_images: Index = 32


@dataclass(frozen=True)
class TeacherRef:
    """Where a pair preset's teacher comes from: a detector preset and, ideally, its weights."""

    preset: str  # a detector preset naming the teacher's model
    weights: str | None = None  # local crosskd .safetensors; None = must be given by --teacher
    how_to_get: str = ""  # shown when the weights are missing


@dataclass(frozen=True)
class Preset:
    """A detector preset (for `teacher`) or a pair preset (for `distill`, with `teacher` set)."""

    name: str
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)  # the detector trained (pair: student)
    teacher: TeacherRef | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: dict[str, Any] = field(default_factory=dict)  # the paper's numbers, not ours
    # Where it was read from (a file, a run's record), for errors found after parsing; never
    # recorded (to_plain leaves it out) and not copied by dataclasses.replace
    source: str = field(default="", init=False, compare=False, repr=False)

    @property
    def is_pair(self) -> bool:
        return self.teacher is not None


# ---------------------------------------------------------------------------- loading


def presets_dir() -> Path:
    """The shipped presets: inside the installed package, or `presets/` of a source checkout."""
    shipped = resources.files("crosskd_cli") / "presets"
    if shipped.is_dir() and any(p.name.endswith(".yaml") for p in shipped.iterdir()):
        return Path(str(shipped))
    return Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def read_preset(name_or_path: str, overrides: list[str] | None = None) -> Preset:
    """Read a shipped preset by name or a YAML file by path, then apply `key=value` overrides:
    parsed and typed, not yet checked against the zoo (`preset_checks.load_preset` is both)."""
    path = _locate(name_or_path)
    return build_preset(_read_yaml(path), overrides, where=str(path), name=path.stem)


def build_preset(raw: Any, overrides: list[str] | None, *, where: str, name: str) -> Preset:
    """A preset from its plain data (a file's, or a mapping an older run folder recorded)."""
    if not isinstance(raw, dict):
        raise PresetError(f"Preset {where} must hold a mapping, got {type(raw).__name__}.")
    raw.setdefault("name", name)
    for item in overrides or []:
        apply_override(raw, item)
    preset = parse(Preset, raw, where=where, policy=PRESET)
    object.__setattr__(preset, "source", where)  # frozen; not a parsed field
    return preset


def _read_yaml(path: Path) -> Any:
    """The preset's data: a small file, without aliases or deep nesting (`bounded`)."""
    try:
        size = path.stat().st_size
        if size > MAX_PRESET_BYTES:
            raise PresetError(
                f"Preset file {path} is {size} bytes; presets are at most "
                f"{MAX_PRESET_BYTES >> 20} MiB.",
                hint="Pass a preset YAML file (a few fields), not a data or weights file.",
            )
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"Preset file {path} cannot be read: {exc}.") from None
    try:
        return load_yaml(text)
    except Unbounded as exc:
        raise PresetError(
            f"Preset file {path} {exc}.",
            hint="Presets are plain mappings of values; see the shipped ones in presets/.",
        ) from None
    except yaml.YAMLError as exc:
        raise PresetError(f"Preset file {path} is not valid YAML: {first_line(exc)}") from None


def _locate(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise PresetError(
                f"Preset file '{name_or_path}' does not exist.",
                hint=f"Shipped presets: {', '.join(list_presets())}",
            )
        return candidate
    shipped = presets_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    close = closest(name_or_path, list_presets(), cutoff=0.5)
    suggestion = f"Did you mean '{close}'? " if close else ""
    raise PresetError(
        f"Preset '{name_or_path}' not found.",
        hint=f"{suggestion}Run `crosskd inspect --list-presets`, or pass a path to a YAML file.",
    )


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b=value` override (value parsed as a YAML scalar/list) to a raw preset dict."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise PresetError(
            f"Override '{item}' is not of the form key=value.",
            hint="Example: --set train.epochs=3 --set distill.cross_index=2",
        )
    try:
        value = load_yaml(text) if text != "" else None
    except Unbounded as exc:
        raise PresetError(f"Override '{item}': the value {exc}.") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"Override '{item}': value '{text}' is not valid YAML.") from exc
    parts = key.strip().split(".")
    _check_override_key(parts, item)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise PresetError(f"Override '{item}': '{part}' is not a section.")
        node = child
    node[parts[-1]] = value


def _check_override_key(parts: list[str], item: str) -> None:
    """Refuse a `--set` key that names no preset field, as the override's own error with the
    closest whole key (`train.epoch` -> `train.epochs`), not as the preset file's."""
    key = ".".join(parts)
    keys, mappings = _keys(Preset)
    if key in keys or any(key.startswith(f"{mapping}.") for mapping in mappings):
        return
    close = closest(key, keys)
    sections = [k for k in keys if "." not in k]
    raise PresetError(
        f"--set {item}: unknown key '{key}'.",
        hint=f"Did you mean '{close}'?"
        if close
        else f"Keys start with one of: {', '.join(sections)}.",
    )


def _dataclass_in(tp: Any) -> Any:
    """The dataclass a field holds (`TeacherRef | None` -> TeacherRef), else None."""
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _keys(cls: Any, prefix: str = "") -> tuple[list[str], list[str]]:
    """Every settable dotted key of a preset (sections included), and those of them that are
    free mappings (`reference`: any key below goes)."""
    keys, mappings = [], []
    hints = typing.get_type_hints(cls)
    for spec in (f for f in dataclasses.fields(cls) if f.init):
        key, tp = prefix + spec.name, hints[spec.name]
        keys.append(key)
        if (typing.get_origin(tp) or tp) is dict:
            mappings.append(key)
        if (inner := _dataclass_in(tp)) is not None:
            sub_keys, sub_mappings = _keys(inner, f"{key}.")
            keys += sub_keys
            mappings += sub_mappings
    return keys, mappings
