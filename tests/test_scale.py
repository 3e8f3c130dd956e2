"""Many processes compute what one does: two gloo processes on CPU, started as users start them.

Conditions under which 2 processes x batch 2 must equal 1 process x batch 4 (docs/method.md
§4.1): images of one size (one padding), no flip, a backbone with frozen BN (a random state
dict given as --backbone-weights), alignment off (its statistics are per process), the plain step
(`train.fast_step=false`), and loss normalisers above their floor of 1 (a student whose class
bias is 0, so that GFL's box weights sum past 1 on every process).

The runs compute in float64 (`float64()` here, `FLOAT64_MAIN` for launched processes): the
equivalence is exact, and float64 takes the CPU's rounding out of the question. In float32 it
cannot be tested on every CPU: the first step's gradients of this random student carry a
relative error of 1e-3 (heads) to 1e-2 (backbone) against float64's in every loss term alike
(sums of many products that nearly cancel), while a one-ulp change of the weights moves the
float64 gradient by 1e-6: no ties, only cancellation. Any other summation order (DDP's sum over
processes against a batch's sum over images; the convolution kernels oneDNN picks for a batch
of 2 or 4 and for the CPU's instruction set) then changes each update by that much, compounding
over 3 momentum steps: weights 1 x 4 against 2 x 2 apart by 0.3% of their movement on an AMD
EPYC (AVX-512), 7% with oneDNN held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`), most of it on an Intel
Xeon with AMX. In float64 they agree to 1e-10 of their movement on both (measured 2026-12-05).

Tolerance: each weight tensor within 1e-6 of how far it moved (UPDATE_RTOL), losses to 1e-6
relative (logged in float32). A wrong normaliser or a duplicated image differs by the size of
the update itself: the tests below that break the equivalence on purpose show the comparison
then fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import make_coco, one_thread
from safetensors.torch import load_file
from test_ddp import free_port
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import make_meta, read_meta, save_checkpoint
from crosskd_cli.cli import app
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.models import build_detector

LOSS_RTOL, UPDATE_RTOL = 1e-6, 1e-6

# crosskd as a launched process computes in float64; {patch} may break it on purpose
FLOAT64_MAIN = """
import sys
import torch
torch.set_default_dtype(torch.float64)
{patch}
from crosskd_cli.cli import app
app(sys.argv[1:], prog_name="crosskd")
"""
# A bug that equivalence tests exist to catch: each process normalises by its own counts
PER_PROCESS_NORMALISER = """
from crosskd_cli.engine import trainer as engine
engine.Trainer.reduce_mean = lambda self, value: value
"""


def make_pair(root: Path, preset: str, same_boxes: bool) -> dict[str, Path]:
    """8 random 64x64 images with 1-3 boxes each (or the same two boxes in every image), a
    random teacher, a student file whose class bias is 0, and a random ResNet-18 state dict."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    images = [{"id": k + 1, "file_name": f"{k}.png", "width": 64, "height": 64} for k in range(8)]
    annotations = []
    for k in range(8):
        for j in range(2 if same_boxes else 1 + k % 3):
            x, y = (4 + 24 * j, 6) if same_boxes else torch.randint(0, 30, (2,), generator=g)
            w, h = (26, 30) if same_boxes else torch.randint(12, 34, (2,), generator=g)
            box = [float(x), float(y), float(w), float(h)]
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "iscrowd": 0,
                                "category_id": (3, 7)[(k + j) % 2], "bbox": box})  # fmt: skip
    make_coco(root / "coco", images, annotations)
    spec = dataclasses.replace(load_preset(preset).model, num_classes=2, backbone="resnet18")
    meta = make_meta(load_preset(preset), spec, "teacher", class_names=["cat", "dog"],
                     category_ids=[3, 7], val_data=str(root / "coco"), training={})  # fmt: skip
    torch.manual_seed(1)
    save_checkpoint(root / "teacher.safetensors", build_detector(spec).state_dict(), meta)
    student = build_detector(spec)
    with torch.no_grad():
        student.head.cls_predictor.bias.zero_()
    save_checkpoint(root / "student.safetensors", student.state_dict(), meta)
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    return {name: root / name for name in ("coco", "teacher.safetensors", "student.safetensors",
                                           "r18.pth")}  # fmt: skip


def distill_args(files: dict[str, Path], pair: str, method: str, out: Path, *extra: str):
    return [
        "distill", "--preset", pair, "--data", str(files["coco"]),
        "--other-teacher", "--teacher", str(files["teacher.safetensors"]),
        "--student-weights", str(files["student.safetensors"]),
        "--backbone-weights", str(files["r18.pth"]), "--out", str(out),
        "--set", f"distill.method={method}", "--set", "distill.align=false",
        "--set", "data.scale=[64,64]", "--set", "data.flip_prob=0", "--set", "data.num_workers=0",
        "--set", "train.max_iters=3", "--set", "train.warmup_iters=2",
        "--set", "train.log_interval=1", "--set", "train.eval_batch_size=3",
        "--set", "train.mixed_precision='no'", "--set", "train.fast_step=false", *extra,
    ]  # fmt: skip


def launch(launcher: str, log: Path, *args: str) -> tuple[int, str]:
    """crosskd as two processes, as a user starts it: `accelerate launch --multi_gpu
    --num_processes 2 -m crosskd_cli ...` or `torchrun --nproc_per_node 2 -m crosskd_cli ...`
    (without GPUs both run two CPU processes over gloo). Output through a file (see
    test_ddp.torchrun)."""
    port = str(free_port())
    if launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", port]  # fmt: skip
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
    target = ["-m", "crosskd_cli"] if not args[0].endswith(".py") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        code = subprocess.run([*head, *target, *args], stdout=out, stderr=subprocess.STDOUT,
                              timeout=600, env=env).returncode  # fmt: skip
    return code, log.read_text()


@contextlib.contextmanager
def float64():
    """Models, data and losses in float64 (the models are built in the default dtype), on one
    thread as each launched process (OMP_NUM_THREADS=1)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with one_thread():
            yield
    finally:
        torch.set_default_dtype(dtype)


def one_process(*args: str):
    """crosskd in this process, in float64."""
    with float64():
        result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def launch_float64(
    root: Path, name: str, *args: str, launcher: str = "accelerate", patch: str = ""
) -> tuple[int, str]:
    """crosskd as 2 processes (`launch`), in float64, with `patch` run first."""
    driver = root / f"{name}.py"
    driver.write_text(FLOAT64_MAIN.format(patch=patch))
    return launch(launcher, root / f"{name}.log", str(driver), *args)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path) -> None:
    assert_same_losses(one, two)
    assert_same_weights(one, two)


def assert_same_losses(one: Path, two: Path) -> None:
    """Same losses at every iteration (the mean over processes), same lr."""
    a, b = records(one), records(two)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        losses = [k for k in ra if k.startswith(("loss_", "kd_"))]
        assert losses and losses == [k for k in rb if k.startswith(("loss_", "kd_"))]
        for key in losses:
            assert rb[key] == pytest.approx(ra[key], rel=LOSS_RTOL), (ra["iteration"], key)
        assert rb["lr"] == ra["lr"]


def assert_same_weights(one: Path, two: Path) -> None:
    """Each weight tensor within UPDATE_RTOL of how far the run moved it."""
    wa, wb = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    start = load_file(one.parent / "files" / "student.safetensors")
    assert wa["head.cls_predictor.weight"].dtype == torch.float64
    moved = {k: (wa[k] - start[k]).abs().max().item() for k in wa}
    assert max(moved.values()) > 1e-4  # the runs trained: equal weights are not the start's
    for key in wa:
        apart = (wb[key] - wa[key]).abs().max().item()
        assert apart <= UPDATE_RTOL * moved[key], (
            f"{key}: apart by {apart:.3g}, {apart / max(moved[key], 1e-300):.3g} of how far it "
            f"moved ({moved[key]:.3g})"
        )


@pytest.fixture(scope="module")
def gfl(tmp_path_factory):
    """The GFL pair's files and its one-process reference: 1 process x batch 4."""
    root = tmp_path_factory.mktemp("gfl")
    files = make_pair(root / "files", "shapes-gfl-r50-to-r18", same_boxes=False)
    one_process(*distill_args(files, "shapes-gfl-r50-to-r18", "crosskd+mimic", root / "one",
                              "--set", "train.batch_size=4", "--eval-teacher"))  # fmt: skip
    return root, files


@pytest.fixture(scope="module")
def gfl_two(gfl):
    """The same distillation as `accelerate launch` of 2 processes x batch 2."""
    root, files = gfl
    args = distill_args(files, "shapes-gfl-r50-to-r18", "crosskd+mimic", root / "two",
                        "--set", "train.batch_size=2", "--eval-teacher")  # fmt: skip
    code, output = launch_float64(root, "two", *args)
    assert code == 0, output[-3000:]
    return root / "two", output


def test_two_processes_of_batch_2_train_as_one_process_of_batch_4(gfl, gfl_two):
    """CrossKD and mimic terms and the GT losses (the `none` baseline's) in one run."""
    root, _ = gfl
    two, output = gfl_two
    assert_same_training(root / "one", two)
    assert "lr 0.0025 = 0.01 x total batch 4 images (2 processes x 2 images x 1 accumulated " \
           "step) / base batch 16." in output  # fmt: skip
    # --eval-teacher under two processes: each predicted half, both got the whole AP
    assert output.count("teacher on") == 1
    one_meta, two_meta = (
        read_meta(root / "one" / "best.safetensors"),
        read_meta(two / "best.safetensors"),
    )
    assert two_meta.training["teacher_ap"] == one_meta.training["teacher_ap"]
    assert two_meta.training["processes"] == 2


@pytest.fixture(scope="module")
def retinanet(tmp_path_factory):
    """The RetinaNet pair's files, every image holding the same two boxes, and its
    one-process reference: batch 4."""
    root = tmp_path_factory.mktemp("retinanet")
    files = make_pair(root / "files", "shapes-retinanet-r34-to-r18", same_boxes=True)
    one_process(*distill_args(files, "shapes-retinanet-r34-to-r18", "crosskd+mimic",
                              root / "one", "--set", "train.batch_size=4"))  # fmt: skip
    return root, files


def accumulate_2_of_batch_2(retinanet, out: Path):
    _, files = retinanet
    return one_process(*distill_args(files, "shapes-retinanet-r34-to-r18", "crosskd+mimic", out,
                                     "--set", "train.batch_size=2",
                                     "--set", "train.grad_accum=2"))  # fmt: skip


def test_accumulating_2_forwards_of_batch_2_trains_as_batch_4(retinanet, tmp_path):
    """In one process. Each forward is normalised by its own positives (docs/method.md §4.1),
    so the equality needs forwards with equal normalisers: RetinaNet's are counts of the
    ground truth's positives, equal here where every image holds the same two boxes."""
    root, _ = retinanet
    result = accumulate_2_of_batch_2(retinanet, tmp_path / "accumulated")
    assert "lr 0.0025 = 0.01 x total batch 4 images (1 process x 2 images x 2" in result.output
    assert_same_training(root / "one", tmp_path / "accumulated")


# slow: the undivided-accumulation mutation below keeps a proof in the default suite
@pytest.mark.slow
def test_the_equivalence_tests_fail_on_a_normaliser_kept_per_process(gfl, tmp_path):
    """The comparison can fail: each process normalising by its own positives (the bug the
    process test exists for) moves losses and weights by far more than UPDATE_RTOL."""
    root, files = gfl
    args = distill_args(files, "shapes-gfl-r50-to-r18", "crosskd+mimic", tmp_path / "two",
                        "--set", "train.batch_size=2")  # fmt: skip
    code, output = launch_float64(tmp_path, "two", *args, patch=PER_PROCESS_NORMALISER)
    assert code == 0, output[-3000:]
    with pytest.raises(AssertionError):
        assert_same_losses(root / "one", tmp_path / "two")
    with pytest.raises(AssertionError, match="of how far it moved"):
        assert_same_weights(root / "one", tmp_path / "two")


def test_the_equivalence_tests_fail_on_accumulated_losses_left_undivided(
    retinanet, tmp_path, monkeypatch
):
    """The comparison can fail: an accumulating step that sums its forwards' gradients without
    dividing each by their number (as Accelerate does) trains with twice the gradient."""
    root, _ = retinanet
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kwargs: loss.backward())
    accumulate_2_of_batch_2(retinanet, tmp_path / "accumulated")
    with pytest.raises(AssertionError, match="^[(]2, "):  # the first step's losses are right
        assert_same_losses(root / "one", tmp_path / "accumulated")
    with pytest.raises(AssertionError, match="of how far it moved"):
        assert_same_weights(root / "one", tmp_path / "accumulated")


def test_a_two_process_run_resumes_in_one_process_with_the_same_total_batch(gfl, gfl_two):
    two, _ = gfl_two
    more = ["--set", "train.max_iters=4"]
    refused = CliRunner().invoke(app, ["distill", "--resume", "--out", str(two), *more])
    assert refused.exit_code == 2
    assert "trained with a total batch of 4 images per step; resumed now it would be 2 " \
           "images (1 process x 2 images x 1 accumulated step)" in refused.output  # fmt: skip
    assert "--set train.grad_accum=2" in refused.output
    assert json.loads((two / "last" / "trainer_state.json").read_text())["iteration"] == 3
    one_process("distill", "--resume", "--out", str(two), *more, "--set", "train.grad_accum=2")
    state = json.loads((two / "last" / "trainer_state.json").read_text())
    assert state["iteration"] == 4 and state["total_batch"] == 4


def test_eval_in_two_processes_gives_the_one_process_metrics_exactly(
    mixed_size_checkpoint, tmp_path
):
    """13 images (odd) in batches of 2 over 2 processes: every image predicted, once."""
    data, checkpoint, _ = mixed_size_checkpoint
    one_process("eval", str(checkpoint), "--data", data.spec, "--batch-size", "2", "-o",
                str(tmp_path / "one"))  # fmt: skip
    code, output = launch_float64(tmp_path, "two", "eval", str(checkpoint), "--data", data.spec,
                                  "--batch-size", "2", "-o", str(tmp_path / "two"),
                                  launcher="torchrun")  # fmt: skip
    assert code == 0, output[-3000:]
    assert output.count("Wrote ") == 1  # the main process writes, once
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in two.items() if k != "device"} == {
        k: v for k, v in one.items() if k != "device"
    }
    predictions = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert predictions == json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} == set(range(1, 14))


SAMPLER = """
import json, sys
from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.data.collate import build_loader
from crosskd_cli.engine.accelerator import make_accelerator

acc = make_accelerator(TrainConfig(batch_size=2, mixed_precision="no"))
loader = acc.prepare(build_loader(list(range(20)), batch_size=2, shuffle=True, drop_last=True))
seen = []
for epoch in range(2):
    loader.set_epoch(epoch)
    seen.append([index for batch in loader for index in batch])
with open(f"{sys.argv[1]}/{acc.process_index}.json", "w") as f:
    json.dump(seen, f)
"""


def test_the_sampler_shards_without_duplicates_and_reshuffles_every_epoch(tmp_path):
    driver = tmp_path / "sampler.py"
    driver.write_text(
        SAMPLER.replace(
            "from crosskd_cli.data.collate import build_loader",
            "import crosskd_cli.data.collate\n"
            "c = sys.modules['crosskd_cli.data.collate']\n"
            "c.collate = lambda items: items  # plain indices, not images\n"
            "build_loader = c.build_loader",
        )
    )
    code, output = launch("torchrun", tmp_path / "s.log", str(driver), str(tmp_path))
    assert code == 0, output[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    for epoch in range(2):
        assert sorted(rank0[epoch] + rank1[epoch]) == list(range(20))  # each index once
    assert rank0[0] + rank1[0] != rank0[1] + rank1[1]  # a new order each epoch


KILL_ONE_RANK = """
import os, signal, sys
from crosskd_cli.engine import guards

if os.environ.get("RANK") == "1":  # this process dies (SIGKILL: no handler, no save)
    check, seen = guards.NonFiniteGuard.check, {"steps": 0}

    def counting(self, losses, norm):
        seen["steps"] += 1
        if seen["steps"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return check(self, losses, norm)

    guards.NonFiniteGuard.check = counting
from crosskd_cli.cli import app
app(sys.argv[1:], prog_name="crosskd")
"""


@pytest.mark.slow
def test_a_process_that_dies_ends_the_run_with_its_last_state_which_resumes(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_ONE_RANK)
    run = tmp_path / "run"
    args = ["teacher", "--preset", "shapes-gfl-r18", "--data",
            "builtin:shapes:images=24,val=8,size=96", "--set", "data.num_workers=0",
            "--set", "data.scale=[96,96]", "--set", "train.batch_size=2",
            "--set", "train.max_iters=6", "--set", "train.state_interval=2",
            "--set", "train.log_interval=1", "--set", "train.collective_timeout=20",
            "--out", str(run)]  # fmt: skip
    code, output = launch("torchrun", tmp_path / "kill.log", str(driver), *args)
    output = " ".join(output.split())  # the message as one line, however rich wrapped it
    assert code != 0
    assert "lost the others at iteration 2" in output, output[-3000:]
    assert f"the last saved state, {run / 'last'} (iteration 2), is kept" in output
    code, output = launch("torchrun", tmp_path / "resume.log", "teacher", "--resume",
                          "--out", str(run))  # fmt: skip
    assert code == 0, output[-3000:]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["iteration"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "mimic", "crosskd"])
def test_each_method_under_torchrun_trains_as_one_process(tmp_path, method):
    files = make_pair(tmp_path / "files", "shapes-gfl-r50-to-r18", same_boxes=False)
    pair = "shapes-gfl-r50-to-r18"
    one_process(*distill_args(files, pair, method, tmp_path / "one", "--set",
                              "train.batch_size=4"))  # fmt: skip
    code, output = launch_float64(tmp_path, "two",
                                  *distill_args(files, pair, method, tmp_path / "two", "--set",
                                                "train.batch_size=2"),
                                  launcher="torchrun")  # fmt: skip
    assert code == 0, output[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_per_process_alignment_and_pkd_statistics_stay_close_to_one_process(tmp_path):
    """Alignment (§2.4) and PKD (§3.7) standardise over this process's images: 2 x 2 is not
    1 x 4. Measured here (64 px images, so P6/P7 hold 1-4 pixels per image): cross-head KD
    terms within 1.5%, PKD 9-14% lower, weights apart by a third of the update after 3 steps.
    Bounds with some margin; a run that shards wrongly differs by far more."""
    pair = "shapes-gfl-r50-to-r18"
    files = make_pair(tmp_path / "files", pair, same_boxes=False)
    aligned = ["--set", "distill.align=true"]
    one_process(*distill_args(files, pair, "crosskd+pkd", tmp_path / "one", *aligned,
                              "--set", "train.batch_size=4"))  # fmt: skip
    code, output = launch_float64(tmp_path, "two",
                                  *distill_args(files, pair, "crosskd+pkd", tmp_path / "two",
                                                *aligned, "--set", "train.batch_size=2"),
                                  launcher="torchrun")  # fmt: skip
    assert code == 0, output[-3000:]
    for ra, rb in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        for key, rel in (("kd_cross_cls", 0.03), ("kd_cross_box", 0.03), ("kd_pkd", 0.2)):
            assert rb[key] == pytest.approx(ra[key], rel=rel), (ra["iteration"], key)
    start = load_file(files["student.safetensors"])
    wa, wb = (
        load_file(tmp_path / "one" / "last.safetensors"),
        load_file(tmp_path / "two" / "last.safetensors"),
    )
    moved = max((wa[k] - start[k]).abs().max().item() for k in wa)
    apart = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert apart < 0.5 * moved
