"""The training loop's lr scaling and the zero-KD warning (the schedule: test_schedule.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.engine.guards import ZeroWatch
from crosskd_cli.engine.total_batch import scaled_lr


def test_lr_scales_linearly_with_the_total_batch():
    cfg = TrainConfig(lr=0.01, batch_size=2, base_batch_size=16)
    assert scaled_lr(cfg, num_processes=8) == pytest.approx(0.01)
    assert scaled_lr(cfg, num_processes=1) == pytest.approx(0.00125)


def test_a_kd_term_stuck_at_zero_is_reported_once():
    console = Console(record=True, width=200)
    watch = ZeroWatch(("kd_cross_cls", "kd_cross_box"))
    watch.check({"kd_cross_cls": 0.0, "kd_cross_box": 0.2}, iteration=10, console=console)
    assert console.export_text() == ""  # too early to judge
    watch.check({"kd_cross_cls": 0.0, "kd_cross_box": 0.2}, iteration=20, console=console)
    watch.check({"kd_cross_cls": 0.0, "kd_cross_box": 0.2}, iteration=30, console=console)
    text = console.export_text()
    assert text.count("kd_cross_cls has stayed exactly 0 for the first 20 iterations") == 1
    assert "kd_cross_box" not in text


def test_auto_precision_is_bf16_only_where_the_device_runs_it_natively(monkeypatch):
    import crosskd_cli.engine.accelerator as engine

    monkeypatch.setattr(engine, "native_bf16", lambda device_type: device_type == "cuda")
    assert engine.resolve_precision("auto", "cuda") == "bf16"
    assert engine.resolve_precision("auto", "cpu") == "no"
    assert engine.resolve_precision("fp16", "cpu") == "fp16"


@pytest.mark.parametrize(
    ("setting", "options"),
    [
        ("train.mixed_precision=bf32", "one of 'no', 'fp16', 'bf16', 'auto'"),
        ("train.warmup=cosine", "one of 'linear', 'constant'"),
        ("train.optimizer=adam", "one of 'sgd', 'adamw'"),
        ("model.extra_convs_source=p6", "one of 'p5_output', 'c5'"),
    ],
)
def test_an_unknown_choice_stops_at_the_preset_naming_the_valid_ones(setting, options):
    """The parser refuses these before any work; the engine and model do not check again."""
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.errors import PresetError

    key, _, value = setting.partition("=")
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r50", [setting])
    assert info.value.message.endswith(f"'{key}' must be {options}, got '{value}'.")


def test_bf16_autocasts_the_training_step_but_evaluation_runs_in_fp32(tmp_path):
    """Evaluation in fp32 is what lets `crosskd eval` reproduce the recorded AP exactly."""
    import torch
    from torch import nn

    from crosskd_cli.engine.accelerator import make_accelerator
    from crosskd_cli.engine.trainer import Hooks, Trainer
    from crosskd_cli.storage.run_folder import RunDir

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)
            self.autocast_seen: list[bool] = []

        def forward(self, x):
            self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
            return self.linear(x)

    cfg = TrainConfig(max_iters=2, warmup_iters=0, milestones=(), mixed_precision="bf16")
    probe = Probe()
    (tmp_path / "run").mkdir()
    trainer = Trainer(make_accelerator(cfg), cfg, RunDir(tmp_path / "run"), Console(quiet=True))
    in_evaluation = []

    def step(model, batch):
        return {"loss": model(batch).float().pow(2).mean()}

    def evaluate(model):
        with torch.no_grad():
            model(torch.ones(1, 4))
        in_evaluation.append(probe.autocast_seen[-1])
        return {"AP": 1.0}

    loader = torch.utils.data.DataLoader(torch.ones(4, 4), batch_size=2)
    trainer.fit(probe, loader, Hooks(step, evaluate, lambda model, name, metrics: None))
    assert probe.autocast_seen[:2] == [True, True]  # the two training steps
    assert in_evaluation == [False]


def test_a_log_gets_one_line_per_epoch_with_progress_eta_and_losses():
    from crosskd_cli.engine.log_lines import epoch_line

    row = {"epoch": 2, "iteration": 200, "lr": 0.005, "loss_qfl": 0.25, "kd_cross_box": 0.5}
    row["seconds"] = 120.0
    assert epoch_line(row, iteration=200, total=500) == (
        "epoch 2  iter 200/500  2.0 min  eta 3.0 min  loss 0.750 qfl 0.250 kd_cross_box 0.500"
    )
