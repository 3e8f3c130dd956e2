"""Every command, run from an installed wheel outside the checkout, on tiny built-in data.

Run by .ci/run with the wheel's virtual environment: a packaging hole (a subpackage or a preset
missing from the wheel) fails here, where `pip install -e .` would have hidden it.
Usage: python wheel_smoke.py CHECKOUT WORKDIR
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import crosskd_cli  # first, so the wheel's copy is the one imported

checkout, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
package = Path(crosskd_cli.__file__).resolve()
if checkout in package.parents:
    sys.exit(f"crosskd_cli was imported from the checkout ({package}), not from the wheel")

CROSSKD = [str(Path(sys.executable).with_name("crosskd"))]
DATA = "builtin:shapes:images=16,val=4,size=64"
TINY = [
    "--data", DATA, "--set", "train.max_iters=2", "--set", "train.batch_size=2",
    "--set", "train.eval_batch_size=4", "--set", "data.num_workers=0",
    "--set", "data.scale=[64,64]", "--set", "train.warmup_iters=1",
]  # fmt: skip
ENV = {**os.environ, "CROSSKD_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}


def crosskd(*args: str) -> str:
    start = time.perf_counter()
    done = subprocess.run(
        [*CROSSKD, *args], cwd=work, env=ENV, capture_output=True, text=True, check=False
    )
    print(f"  {time.perf_counter() - start:5.1f} s  crosskd {' '.join(args[:3])} ...")
    if done.returncode != 0:
        sys.exit(f"crosskd {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


print(f"wheel smoke: crosskd_cli from {package.parent}")
crosskd("--help")
crosskd("quickstart", "--help")
crosskd("inspect")
crosskd("inspect", "--preset", "shapes-fcos-r34-to-r18", "--format", "json")
crosskd("teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", "teacher")
crosskd(
    "distill", "--preset", "shapes-gfl-r50-to-r18", *TINY, "--set", "model.backbone=resnet18",
    "--other-teacher", "--teacher", "teacher/best.safetensors", "--out", "student",
)  # fmt: skip  # an R18 teacher in the place of the pair's R50, on purpose (fast)
crosskd("eval", "student/best.safetensors", "--out", "eval")

# `teacher import` of an MMDetection-layout file made from the teacher just trained; the key
# layout comes from the test suite's helper, the one the import tests use.
sys.path.append(str(checkout))
import torch  # noqa: E402

from crosskd_cli.checkpoints.format import load_checkpoint, load_state_into  # noqa: E402
from crosskd_cli.models import build_detector  # noqa: E402
from tests.test_import import mmdetection_layout  # noqa: E402

state, meta = load_checkpoint(work / "teacher" / "best.safetensors")
model = build_detector(meta.model)
load_state_into(model, state, source="teacher")
torch.save({"state_dict": mmdetection_layout(model)}, work / "mmdet_teacher.pth")
crosskd(
    "teacher", "import", "mmdet_teacher.pth", "--preset", "shapes-gfl-r18", "--data", DATA,
    "--out", "imported.safetensors",
)  # fmt: skip
crosskd("eval", "imported.safetensors", "--out", "eval-imported")
print("wheel smoke: every command ran from the wheel")
