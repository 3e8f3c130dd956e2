"""ImageNet backbone initialisation (`model.backbone_init`): presets, the torch hub cache, the
CLI's refusal without the file, loading and freezing through a real run, offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import load_checkpoint
from crosskd_cli.cli import app
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import list_presets
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.errors import ModelError, PresetError
from crosskd_cli.models import build_detector
from crosskd_cli.models.pretrained import BACKBONE_INITS, SCRATCH, cache_path, resolve
from crosskd_cli.runs import jobs

runner = CliRunner()
R18 = "torchvision://resnet18"
DATA = "builtin:shapes:images=24,val=8,size=96"
TINY = [
    "--data", DATA,
    "--set", "train.max_iters=3", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
    "--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
]  # fmt: skip
WITH_INIT = ["--preset", "shapes-gfl-r18", "--set", f"model.backbone_init={R18}"]


def test_every_paper_preset_starts_from_imagenet_and_every_shapes_preset_from_scratch():
    for name in list_presets():
        spec = load_preset(name).model
        if name.startswith("shapes-"):
            assert spec.backbone_init == SCRATCH, name
        else:
            source = BACKBONE_INITS[spec.backbone_init]
            assert source is not None and spec.backbone in source.backbones, name
            assert re.fullmatch(r"[\w.]+-[0-9a-f]{8}\.pth", source.file), source.file
            assert source.url.endswith("/" + source.file)


def test_the_schema_refuses_an_unknown_init_and_check_spec_a_misfit():
    with pytest.raises(PresetError, match="backbone_init"):
        load_preset("gfl-r50", ["model.backbone_init=imagenet"])
    with pytest.raises(ModelError, match="holds a resnet50 backbone, not the model's resnet18"):
        load_preset("gfl-r18", ["model.backbone_init=torchvision://resnet50"])


def random_resnet18(seed: int = 3) -> dict[str, torch.Tensor]:
    """A resnet18 state dict with random BN statistics, unlike a fresh model's 0 / 1."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    return state


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def cached_r18(torch_home):
    path = cache_path(BACKBONE_INITS[R18])
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    state = random_resnet18()
    torch.save(state, path)
    return path, state


def test_a_missing_file_stops_before_any_data_naming_the_file_its_place_and_both_options(
    torch_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["teacher", *WITH_INIT, *TINY, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "Error: The resnet18 backbone starts from ImageNet weights" in result.output
    assert "resnet18-f37072fd.pth" in result.output and str(expected) in result.output
    assert "--backbone-weights FILE" in result.output and "--download-weights" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_download_weights_fetches_into_the_hub_cache(torch_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    spec = ModelSpec(
        backbone="resnet50_caffe", backbone_init="open-mmlab://detectron2/resnet50_caffe"
    )
    path = resolve(spec, None, download=True)
    file = "resnet50_msra-5891d200.pth"
    assert path == torch_home / "hub" / "checkpoints" / file
    assert calls == [
        (f"https://download.openmmlab.com/pretrain/third_party/{file}", str(path), "5891d200")
    ]
    assert resolve(spec, None, download=False) == path  # cached from now on: no network
    assert len(calls) == 1


def test_given_weights_win_and_scratch_needs_nothing(torch_home, tmp_path):
    assert resolve(ModelSpec(backbone="resnet18"), None, download=False) is None
    given = tmp_path / "mine.pth"
    given.write_bytes(b"")
    assert resolve(ModelSpec(backbone="resnet18", backbone_init=R18), given, False) == given
    with pytest.raises(ModelError, match="does not exist"):
        resolve(ModelSpec(backbone="resnet18"), tmp_path / "nope.pth", False)


def test_teacher_loads_freezes_and_trains_from_the_cached_file_and_eval_needs_none(
    cached_r18, tmp_path, monkeypatch
):
    path, saved = cached_r18
    built = []

    def spy(spec, backbone_weights=None, **options):
        built.append(build_detector(spec, backbone_weights=backbone_weights, **options))
        return built[-1]

    monkeypatch.setattr(jobs, "build_detector", spy)
    out = tmp_path / "run"
    result = runner.invoke(app, ["teacher", *WITH_INIT, *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"backbone from {path}" in result.output
    backbone = built[0].backbone
    assert not any(
        p.requires_grad for p in [*backbone.conv1.parameters(), *backbone.layer1.parameters()]
    )
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))

    state, meta = load_checkpoint(out / "last.safetensors")
    assert meta.model.backbone_init == R18
    for key, value in saved.items():
        if key.startswith(("conv1.", "bn1.", "layer1.")) or "running_" in key:
            # frozen stem and layer1, and every BN's statistics (norm_eval), as in the file
            assert torch.equal(state[f"backbone.{key}"], value), key
    trained = state["backbone.layer4.1.conv2.weight"]
    assert not torch.equal(trained, saved["layer4.1.conv2.weight"])  # used, then trained
    assert torch.allclose(trained, saved["layer4.1.conv2.weight"], atol=0.05)

    path.unlink()  # rebuilding from the checkpoint looks for no ImageNet file
    result = runner.invoke(
        app, ["eval", str(out / "best.safetensors"), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output


def test_from_scratch_is_said_in_the_banner(torch_home, tmp_path):
    result = runner.invoke(
        app, ["teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert "backbone from scratch" in result.output


def test_mmdetection_named_caffe_weights_load_without_num_batches_tracked(tmp_path):
    spec = ModelSpec(
        backbone="resnet50_caffe",
        backbone_init="open-mmlab://detectron2/resnet50_caffe",
        fpn_channels=64,
        head_channels=64,
    )
    torch.manual_seed(0)
    state = {
        k: v
        for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
        if not k.endswith("num_batches_tracked")  # the MSRA conversion has none; fc.* stays
    }
    path = tmp_path / "resnet50_msra-5891d200.pth"
    torch.save({"state_dict": state}, path)
    backbone = build_detector(spec, backbone_weights=path).backbone
    assert torch.equal(backbone.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert not backbone.layer1[0].conv1.weight.requires_grad


def mmcls_mobilenet_v2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (torchvision names) under mmcls's MobileNetV2 names, as MMDetection's file has
    them: every name the converter maps, found by running it on each candidate."""
    from crosskd_cli.models.backbone_import import convert_mmdet_backbone
    from crosskd_cli.models.mobilenet import LAYER_BLOCKS

    params = [
        "conv.weight",
        *(f"bn.{p}" for p in ("weight", "bias", "running_mean", "running_var")),
    ]
    names = [f"conv1.{p}" for p in params]
    for layer, blocks in enumerate(LAYER_BLOCKS, 1):
        for block in range(blocks):
            for index in range(3):
                names += [f"layer{layer}.{block}.conv.{index}.{p}" for p in params]
    mapped = {}
    for name in names:
        converted, _ = convert_mmdet_backbone("mobilenet_v2", {name: torch.empty(0)})
        if converted:
            (ours,) = converted
            mapped[name] = state[ours]
    return mapped


def test_mmdetection_named_mobilenet_v2_loads_from_its_mmcls_checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone="mobilenet_v2", backbone_init="open-mmlab://mmdet/mobilenet_v2",
        fpn_channels=64, head_channels=64,
    )  # fmt: skip
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    mmcls = {f"backbone.{k}": v for k, v in mmcls_mobilenet_v2(state).items()}
    mmcls["backbone.conv2.conv.weight"] = torch.zeros(1280, 320, 1, 1)  # classifier only
    mmcls["head.fc.weight"] = torch.zeros(1000, 1280)
    path = tmp_path / "mobilenet_v2_batch256_imagenet-ff34753d.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": mmcls}, path)
    backbone = build_detector(spec, backbone_weights=path).backbone
    ours = backbone.state_dict()
    loaded = [k for k, v in state.items() if k in ours and "num_batches" not in k]
    assert len(loaded) > 100
    assert all(torch.equal(ours[k], state[k]) for k in loaded)


def test_quickstart_on_a_paper_pair_asks_for_its_imagenet_files_before_any_data(
    torch_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(
        app, ["quickstart", "--preset", "gfl-r50-to-r18", "--data", DATA, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert str(torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in result.output
    assert "--download-weights" in result.output and "--backbone-weights" not in result.output
    assert not (tmp_path / "cache").exists()
