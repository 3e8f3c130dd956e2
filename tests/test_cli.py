"""The command line as a user meets it: help, errors, and tiny end-to-end runs on built-in data."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from crosskd_cli import __version__
from crosskd_cli.checkpoints.format import load_checkpoint, read_meta
from crosskd_cli.cli import app

runner = CliRunner()
TINY_DATA = "builtin:shapes:images=24,val=8,size=96"
TINY = [
    "--data", TINY_DATA,
    "--set", "train.max_iters=3", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
    "--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_four_subcommands_and_the_quickstart():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("teacher", "distill", "eval", "inspect", "quickstart"):
        assert command in result.output


def test_version_prints_the_package_version():
    assert invoke("--version").output.strip() == f"crosskd {__version__}"


@pytest.mark.parametrize(
    "command,option",
    [
        ("teacher", "--backbone-weights"),
        ("distill", "--cross-index"),
        ("eval", "--backend"),
        ("inspect", "--image-size"),
        ("predict", "--score-thr"),
        ("export", "--format"),
    ],
)
def test_each_subcommand_documents_its_options_and_an_example(command, option):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert option in result.output and "Example" in result.output


PREDICTORS = ("cls_predictor", "box_predictor")
HEAVY = ("torch", "torchvision", "accelerate", "matplotlib")


def test_importing_the_app_leaves_torch_out():
    code = f"import sys, crosskd_cli.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_parsing_every_preset_and_its_overrides_leaves_torch_out():
    """The configuration layer is torch-free for good: no table of torch code behind a field
    (head families, backbones) is imported to parse, an unknown name included."""
    code = (
        "import sys\nfrom crosskd_cli.config.presets import list_presets, read_preset\n"
        "for name in list_presets():\n    read_preset(name)\n"
        "read_preset('gfl-r50', ['model.family=yolo', 'distill.method=crosskd+nope'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command", [[], ["teacher"], ["teacher", "import"], ["distill"], ["eval"], ["inspect"],
                ["quickstart"], ["predict"], ["export"]]
)  # fmt: skip
def test_help_of_every_command_answers_without_importing_torch(command):
    code = (
        "import sys\nfrom crosskd_cli.cli import app\n"
        f"try:\n    app({[*command, '--help']!r}, prog_name='crosskd')\n"
        "except SystemExit:\n    pass\n"
        f"print('heavy:', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: crosskd" in done.stdout
    assert done.stdout.rstrip().endswith("heavy: []")


def test_flags_read_as_flags_in_help():
    output = runner.invoke(app, ["teacher", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--resume +Continue an interrupted run", output)
    assert "<bool>" not in output


def test_teacher_defaults_to_the_default_pairs_teacher():
    from crosskd_cli.config.presets import DEFAULT_PAIR, DEFAULT_TEACHER
    from crosskd_cli.distill.preset_checks import load_preset

    assert load_preset(DEFAULT_PAIR).teacher.preset == DEFAULT_TEACHER
    assert re.search(r"--preset .*\[default: gfl-r101\]", invoke("teacher", "--help").output)


def test_a_user_error_is_one_red_line_with_a_hint_and_exit_code_2():
    result = runner.invoke(app, ["teacher", "--preset", "gfl_r5O"])
    assert result.exit_code == 2
    assert "Error: Preset 'gfl_r5O' not found." in result.output
    assert "Traceback" not in result.output


def test_bare_inspect_shows_the_default_pair_and_lists_the_presets():
    result = invoke("inspect")
    assert result.exit_code == 0
    assert "gfl-r101-to-r50" in result.output and "cross index 3" in result.output
    assert "Compatible" in result.output and "shapes-gfl-r50" in result.output


def test_inspect_table_puts_each_per_level_scale_under_its_own_level():
    result = runner.invoke(app, ["inspect", "--preset", "gfl-r101-to-r50"], env={"COLUMNS": "160"})
    scale_rows = [line for line in result.output.splitlines() if "scales.4" in line]
    cells = [cell.strip() for cell in scale_rows[0].split("│")[1:-1]]
    # layer, out ch, P3..P7, params, cross branch: P7 (7x11 at 800x1333) is the only shape
    assert cells[:8] == ["scales.4", "68", "", "", "", "", "7x11", "1"]


def test_inspect_json_reports_shapes_reused_layers_and_compatibility():
    result = invoke(
        "inspect", "--preset", "gfl-r101-to-r50", "--cross-index", "3", "--format", "json"
    )
    report = json.loads(result.output)
    assert report["compatible"] is True and report["image_size"] == [800, 1333]
    assert report["teacher"]["fpn_levels"][0] == [256, 100, 168]
    assert report["teacher"]["params"]["backbone"] > report["student"]["params"]["backbone"]
    reused = report["reused_teacher_layers"]
    assert "towers.cls.3.conv" in reused and "cls_predictor" in reused and "scales.4" in reused
    assert "towers.cls.2.conv" not in reused


@pytest.mark.parametrize(
    ("pair", "index", "predictors"),
    [
        ("retinanet-r101-to-r50", 3, set(PREDICTORS)),
        ("atss-r101-to-r50", 3, {*PREDICTORS, "centerness_predictor", "scales.0"}),
        ("fcos-r101-to-r50", 2, {*PREDICTORS, "centerness_predictor", "scales.0"}),
        ("retinanet-swint-to-r50", 3, set(PREDICTORS)),
        ("retinanet-r50-to-mbv2", 3, set(PREDICTORS)),
    ],
)
def test_inspect_shows_every_family_and_backbone_pair(pair, index, predictors):
    report = json.loads(invoke("inspect", "--preset", pair, "--format", "json").output)
    assert report["compatible"] is True and report["cross_index"] == index
    reused = set(report["reused_teacher_layers"])
    assert predictors <= reused
    assert f"towers.cls.{index}.conv" in reused and f"towers.cls.{index - 1}.conv" not in reused
    anchors = 9 if pair.startswith("retinanet") else 1
    assert report["teacher"]["fpn_levels"][0] == [256, 100, 168]
    cls_rows = [r for r in report["teacher"]["layers"] if r["name"] == "cls_predictor"]
    assert cls_rows[0]["shapes"][0][0] == anchors * 80


def test_inspect_shows_the_adapter_a_narrower_student_head_needs():
    narrow = ["inspect", "--set", "model.head_channels=128", "--format", "json"]
    refused = json.loads(invoke(*narrow).output)
    assert refused["compatible"] is False and refused["adapter"] is None
    assert "tap widths at index 3 differ: teacher 256, student 128" in refused["problems"][0]
    bridged = json.loads(invoke(*narrow, "--set", "distill.adapter=true").output)
    assert bridged["compatible"] is True
    assert bridged["adapter"] == {"from_channels": 128, "to_channels": 256}
    table = invoke("inspect", "--set", "model.head_channels=128", "--set", "distill.adapter=true")
    assert "Tap adapter: a 1x1 conv per tower maps the student's 128 channels" in table.output


def test_inspect_refuses_an_out_of_range_cross_index():
    result = runner.invoke(app, ["inspect", "--cross-index", "7"])
    assert result.exit_code == 2
    assert "--cross-index 7 is out of range" in result.output


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = invoke("teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", str(out))
    assert result.exit_code == 0, result.output
    # not a terminal: one plain line per epoch stands in for the live bar
    lines = result.output.splitlines()
    assert any(line.startswith("epoch 1  iter 3/3") and "giou" in line for line in lines)
    assert not any(line.startswith("train ━") for line in lines)
    # the closing line names every file the run wrote, and the resumable state
    named = " ".join(result.output.split()).split(f"Files in {out}: ")[1]
    for name in ("best.safetensors", "last.safetensors", "results.csv", "metrics.json",
                 "log.jsonl", "preset.yaml", "config.yaml", "results.png", "last/"):  # fmt: skip
        assert name in named and (out / name.rstrip("/")).exists(), name
    return out


def test_a_teacher_runs_preset_yaml_holds_no_teacher_or_distill_section(teacher_run):
    """A detector trains alone: its recorded settings say nothing of distillation (and still
    resume, the sections taking their defaults)."""
    recorded = yaml.safe_load((teacher_run / "preset.yaml").read_text())
    assert "distill" not in recorded and "teacher" not in recorded
    assert {"model", "data", "train"} <= set(recorded)


def test_teacher_run_leaves_config_results_and_two_checkpoints(teacher_run):
    assert {p.name for p in teacher_run.iterdir()} >= {
        "config.yaml",
        "results.csv",
        "best.safetensors",
        "last.safetensors",
        "metrics.json",
        "last",
    }
    meta = read_meta(teacher_run / "best.safetensors")
    assert meta.kind == "teacher" and meta.val_data == TINY_DATA
    assert meta.training["iterations"] == 3 and "AP" in meta.metrics


def test_eval_without_data_reproduces_the_recorded_ap_exactly(teacher_run, tmp_path):
    ckpt = teacher_run / "best.safetensors"
    recorded = read_meta(ckpt).metrics
    result = invoke("eval", str(ckpt), "--out", str(tmp_path / "e1"))
    assert result.exit_code == 0, result.output
    assert f"validation data {TINY_DATA}" in result.output.replace("\n", " ")
    measured = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert {k: measured[k] for k in ("AP", "AP50", "AP75")} == {
        k: recorded[k] for k in ("AP", "AP50", "AP75")
    }
    assert (
        invoke("eval", str(ckpt), "--data", TINY_DATA, "--out", str(tmp_path / "e2")).exit_code == 0
    )
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["AP"] == recorded["AP"]
    predictions = json.loads((tmp_path / "e1" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {1, 2, 3, 5, 7, 8, 11, 13, 17, 19}


def test_eval_refuses_to_overwrite_files_in_a_chosen_folder(teacher_run, tmp_path):
    ckpt = str(teacher_run / "best.safetensors")
    assert invoke("eval", ckpt, "--out", str(tmp_path)).exit_code == 0
    result = runner.invoke(app, ["eval", ckpt, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_run_folder_is_never_overwritten_without_being_asked(teacher_run):
    result = runner.invoke(
        app, ["teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", str(teacher_run)]
    )
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.output and "--resume" in result.output


def test_resume_continues_from_the_saved_state(tmp_path):
    out = tmp_path / "run"
    assert invoke("teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", str(out)).exit_code == 0
    result = invoke(
        "teacher",
        "--preset",
        "shapes-gfl-r18",
        *TINY,
        "--set",
        "train.max_iters=5",
        "--out",
        str(out),
        "--resume",
    )
    assert result.exit_code == 0, result.output
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["iteration"] == 5
    assert read_meta(out / "last.safetensors").training["iterations"] == 5


def test_distill_writes_a_student_only_checkpoint_that_eval_reads(teacher_run, tmp_path):
    out = tmp_path / "student"
    result = invoke(
        "distill",
        "--preset",
        "shapes-gfl-r50-to-r18",
        *TINY,
        "--set",
        "model.backbone=resnet18",
        "--other-teacher",
        "--teacher",
        str(teacher_run / "best.safetensors"),
        "--cross-index",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "cross index 2" in result.output
    state, meta = load_checkpoint(out / "best.safetensors")
    teacher_state, _ = load_checkpoint(teacher_run / "best.safetensors")
    assert meta.kind == "student" and meta.training["method"] == "crosskd"
    assert meta.training["cross_index"] == 2
    assert len(state) == len(teacher_state)  # the student alone, no teacher tensor inside
    with safe_open(str(out / "best.safetensors"), "pt") as f:
        assert not any(key.startswith("teacher") for key in f.keys())
    assert invoke("eval", str(out / "best.safetensors"), "--data", TINY_DATA).exit_code == 0


def test_a_narrower_student_head_needs_the_adapter_which_is_never_exported(teacher_run, tmp_path):
    narrow = [*TINY, "--set", "model.head_channels=32", "--set", "model.backbone=resnet18"]
    teacher = ["--other-teacher", "--teacher", str(teacher_run / "best.safetensors")]
    refused = runner.invoke(
        app, ["distill", "--preset", "shapes-gfl-r50-to-r18", *narrow, *teacher]
    )
    assert refused.exit_code == 2
    assert "tap widths at index 3 differ: teacher 64, student 32" in refused.output
    assert "--set distill.adapter=true" in refused.output

    out = tmp_path / "narrow"
    adapter = ["--set", "distill.adapter=true", "--out", str(out)]
    result = invoke("distill", "--preset", "shapes-gfl-r50-to-r18", *narrow, *teacher, *adapter)
    assert result.exit_code == 0, result.output
    assert "Tap adapter: 1x1 convs 32 -> 64 channels per tower" in result.output
    state, meta = load_checkpoint(out / "best.safetensors")
    assert meta.model.head_channels == 32
    assert not any("adapter" in key for key in state)
    assert state["head.towers.cls.0.conv.weight"].shape[0] == 32


def test_distill_without_a_teacher_says_how_to_get_one():
    result = runner.invoke(app, ["distill", "--preset", "shapes-gfl-r50-to-r18", *TINY])
    assert result.exit_code == 2
    assert "No teacher weights for preset 'shapes-gfl-r50-to-r18'" in result.output
    assert "crosskd teacher --preset shapes-gfl-r50" in result.output


@pytest.mark.parametrize(
    ("preset", "commands"),
    [
        ("atss-r101-to-r50-pkd",
         ["crosskd teacher import atss_r101_fpn_1x_coco.pth --preset atss-r101"]),
        ("shapes-retinanet-r34-to-r18",
         ["crosskd teacher --preset shapes-retinanet-r34 --data builtin:shapes",
          "crosskd quickstart --preset shapes-retinanet-r34-to-r18",
          "crosskd teacher import FILE --preset shapes-retinanet-r34"]),
    ],
)  # fmt: skip
def test_the_no_teacher_hint_quotes_whole_commands_that_paste(preset, commands):
    """Each command of the hint in its own backticks, nothing else inside them (the model
    zoo remark once sat inside, so the pasted command failed)."""
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.runs.teachers import how_to_get_hint

    pair = load_preset(preset)
    hint = how_to_get_hint(pair.teacher.how_to_get, pair.teacher.preset)
    assert re.findall(r"`([^`]*)`", hint) == commands


def test_distill_refuses_a_teacher_with_another_class_list(teacher_run):
    result = runner.invoke(
        app,
        [
            "distill",
            "--preset",
            "shapes-gfl-r50-to-r18",
            *TINY,
            "--other-teacher",
            "--teacher",
            str(teacher_run / "best.safetensors"),
            "--set",
            "model.head_channels=32",
            "--set",
            "model.norm_groups=16",
        ],
    )
    assert result.exit_code == 2
    assert "cannot be paired: tap widths at index 3 differ: teacher 64, student 32" in (
        result.output.replace("\n", " ")
    )


@pytest.mark.parametrize("family", ["retinanet", "atss", "fcos"])
def test_every_family_trains_distills_and_evaluates_end_to_end(family, tmp_path):
    """The same commands as for GFL: a teacher run, a CrossKD run from it with the family's
    KD terms logged, and `crosskd eval` reproducing the student's recorded AP."""
    teacher = tmp_path / "teacher"
    small = ["--set", "model.backbone=resnet18"]
    result = invoke(
        "teacher", "--preset", f"shapes-{family}-r34", *TINY, *small, "--out", str(teacher)
    )
    assert result.exit_code == 0, result.output
    student = tmp_path / "student"
    result = invoke(
        "distill", "--preset", f"shapes-{family}-r34-to-r18", *TINY,
        "--other-teacher", "--teacher", str(teacher / "best.safetensors"), "--out", str(student),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = read_meta(student / "best.safetensors")
    assert meta.model.family == family and meta.training["cross_index"] == (
        2 if family == "fcos" else 3
    )
    header = (student / "results.csv").read_text().splitlines()[0]
    assert "kd_cross_cls" in header and "kd_cross_box" in header
    assert ("kd_cross_centerness" in header) == (family == "atss")
    config = (student / "preset.yaml").read_text()
    weights = {
        "retinanet": "box_weight: 1.0",
        "atss": "box_weight: 1.0",
        "fcos": "box_weight: 0.75",
    }
    assert weights[family] in config  # the family's KD weights, resolved and recorded
    result = invoke("eval", str(student / "best.safetensors"), "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert measured["AP"] == meta.metrics["AP"]


def test_a_run_logs_every_interval_to_log_jsonl_the_console_and_a_tracker(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "teacher", "--preset", "shapes-gfl-r18", *TINY, "--set", "train.log_interval=1",
        "--log-with", "tensorboard", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert {"epoch", "lr", "loss_qfl", "images_per_s", "eta_s", "max_memory_mb"} <= set(records[0])
    assert records[-1]["eta_s"] == 0.0 and records[0]["images_per_s"] > 0
    lines = [line for line in result.output.splitlines() if line.startswith("iter ")]
    assert len(lines) == 3 and "img/s" in lines[0] and "eta" in lines[0] and "mem" in lines[0]
    assert list((out / "trackers").rglob("events.out.tfevents*"))  # TensorBoard's own file


def test_a_tracker_whose_package_is_missing_is_named_before_training(tmp_path):
    result = runner.invoke(
        app,
        ["teacher", "--preset", "shapes-gfl-r18", *TINY, "--set", "train.log_with=[wandb]",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "train.log_with names 'wandb', but its package is not installed." in result.output
    assert "pip install 'crosskd-cli[wandb]'" in result.output


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_no_option_help_loses_bracketed_text_to_rich_markup():
    """Rich reads `[word]` as markup and drops it: `pip install 'crosskd-cli[tensorboard]'`
    once showed as `pip install 'crosskd-cli'`. Every bracket an option's help holds shows."""
    import typer.main

    root = typer.main.get_command(app)
    checked = 0
    for path, command in _commands(root):
        output = " ".join(
            runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output.split()
        )
        for param in command.params:
            text = (getattr(param, "help", None) or "").replace("\\[", "[")
            for bracketed in re.findall(r"\[[^\]\s]*\]", text):
                assert bracketed in output, f"crosskd {' '.join(path)} {param.name}: {bracketed}"
                checked += 1
    assert checked >= 2  # the trackers' and the export formats' extras at least


@pytest.mark.parametrize("command", [["distill"], ["teacher"], ["teacher", "import", "f.pth"]])
def test_a_set_without_its_equals_sign_is_told_how_to_write_it(command):
    """`--set train.epochs 3` leaves `3` as a stray argument (a subcommand's name to the
    `teacher` group): the error says what was meant, not only "unexpected extra argument"."""
    result = runner.invoke(app, [*command, "--set", "train.epochs", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--set takes KEY=VALUE; write --set train.epochs=3" in result.output
