"""The Accelerator a run trains with: device, processes, precision, seeded data order, trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed

from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.engine.devices import process_state, set_collective_timeout
from crosskd_cli.errors import RunError
from crosskd_cli.storage.run_folder import RunDir


def native_bf16(device_type: str) -> bool:
    """Does this device compute in bf16 natively, so that autocasting to it saves time?

    CPUs without AVX512-BF16 or AMX emulate bf16 and get slower, not faster.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device_type: str) -> str:
    """`train.mixed_precision` -> no, fp16 or bf16; auto is bf16 where it is native, else no."""
    if requested == "auto":
        return "bf16" if native_bf16(device_type) else "no"
    return requested


def make_accelerator(cfg: TrainConfig, run: RunDir | None = None) -> Accelerator:
    """One Accelerator per run: device, processes, fp16 mixed precision, seedable data order,
    and the experiment trackers of `train.log_with` (writing under RUN/trackers/).

    bf16 is not handed to Accelerate: it would also autocast the model's forward for good, so
    evaluation during training would run in bf16 and `crosskd eval` (fp32) could not reproduce
    the recorded AP. The Trainer autocasts the training step alone instead. fp16 stays with
    Accelerate, which owns the gradient scaler it needs.
    """
    process_state()  # fixes CPU-or-GPU before the Accelerator reads it
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.mixed_precision, device_type)
    trackers = list(cfg.log_with)
    check_trackers(trackers)
    accelerator = Accelerator(
        cpu=device_type == "cpu",
        mixed_precision="fp16" if precision == "fp16" else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # an optimizer step every grad_accum forwards, counted by the loop, never cut short
        # by the end of an epoch (the loop drops an epoch's leftover forwards instead)
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # the schedule is per iteration, stepped by hand
        log_with=trackers or None,
        project_dir=str(run.root / "trackers") if run is not None and trackers else None,
    )
    set_seed(cfg.seed, device_specific=False)
    set_collective_timeout(cfg.collective_timeout)
    return accelerator


def check_trackers(names: list[str]) -> None:
    """Each tracker's package must be installed: say which extra brings it, before any work."""
    from accelerate.utils import imports

    for name in names:
        available = getattr(imports, f"is_{name}_available", lambda: False)
        if not available():
            raise RunError(
                f"train.log_with names '{name}', but its package is not installed.",
                hint=f"pip install 'crosskd-cli[{name}]' (or pip install {name}), or drop it "
                "from train.log_with.",
            )


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker configs take scalars only (TensorBoard's hparams): lists become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
