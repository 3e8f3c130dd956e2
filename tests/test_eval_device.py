"""`crosskd eval --device`: the accelerator by default, a device that is not there refused up
front in one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from crosskd_cli.cli import app
from crosskd_cli.engine.devices import default_device, resolve_device
from crosskd_cli.errors import OptionError

runner = CliRunner()


def test_auto_is_the_accelerator_when_there_is_one_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == default_device() and default_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x", "cuda:-1", "CPU", ""])
def test_an_unknown_device_is_refused_with_the_choices(name):
    with pytest.raises(OptionError, match="is not known") as err:
        resolve_device(name)
    assert "auto" in err.value.hint and "cuda:N" in err.value.hint


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(OptionError, match=f"--device {name}: no CUDA GPU is available"):
            resolve_device(name)


def test_a_gpu_index_the_machine_lacks_is_refused_naming_what_it_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(OptionError, match=r"--device cuda:2: this machine has 2 CUDA GPUs"):
        resolve_device("cuda:2")


def test_eval_runs_on_the_device_asked_for_and_records_it(mixed_size_checkpoint, tmp_path):
    _, checkpoint, _ = mixed_size_checkpoint
    result = runner.invoke(app, ["eval", str(checkpoint), "--device", "cpu", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_eval_refuses_a_missing_gpu_before_reading_anything(mixed_size_checkpoint, tmp_path):
    _, checkpoint, _ = mixed_size_checkpoint
    result = runner.invoke(app, ["eval", str(checkpoint), "--device", "cuda", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "--device cuda: no CUDA GPU is available" in result.output
    assert "evaluating on the checkpoint's validation data" not in result.output
    assert not (tmp_path / "metrics.json").exists()
