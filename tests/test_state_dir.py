"""The resumable state survives a kill at every file-system step of its save.

Each case saves state 1, then starts saving state 2 in a child process that SIGKILLs itself
just before one step (`state_dir.on_step`, the hook the engine's save goes through); then the
recovery the next run does must find a complete state: state 2 once its marker is written,
else state 1, and leave exactly `last/` behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crosskd_cli.storage import state_dir

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from crosskd_cli.storage import state_dir

    state, kill_at = Path(sys.argv[1]), sys.argv[2]

    def hook(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def save(iteration):
        state_dir.recover(state)
        tmp = state_dir.fresh_tmp(state)
        state_dir.on_step("write")
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
            (tmp / name).write_bytes(bytes([iteration]) * 4096)
        state_dir.commit(state, {"iteration": iteration, "epoch": 0})

    save(1)
    state_dir.on_step = hook
    save(2)
    """
)


def kill_during_second_save(state: Path, step: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(state), step], env=env, capture_output=True, check=False
    )
    return done.returncode


@pytest.mark.parametrize("step", state_dir.STEPS)
def test_a_kill_before_any_step_of_a_save_leaves_a_complete_state(tmp_path, step):
    state = tmp_path / "last"
    assert kill_during_second_save(state, step) == -signal.SIGKILL
    marker = state_dir.recover(state)
    expected = 2 if step in ("retire", "promote", "drop") else 1  # marked: the new one counts
    assert marker is not None and marker["iteration"] == expected
    assert json.loads((state / "trainer_state.json").read_text())["iteration"] == expected
    assert (state / "model.safetensors").read_bytes() == bytes([expected]) * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no .tmp, .old or trash


def test_a_half_deleted_old_state_from_an_earlier_kill_is_cleared_not_resumed(tmp_path):
    """The reported failure: `last.old/` half deleted used to break every later save."""
    state = tmp_path / "last"
    assert kill_during_second_save(state, "drop") == -signal.SIGKILL
    old = state_dir.old_of(state)
    old.mkdir(exist_ok=True)
    (old / "x").write_text("half of a state")
    assert state_dir.recover(state)["iteration"] == 2
    assert not old.exists()
    tmp = state_dir.fresh_tmp(state)  # and the next save goes through
    state_dir.commit(state, {"iteration": 3})
    assert state_dir.read_marker(state)["iteration"] == 3 and not tmp.exists()


def test_a_folder_without_its_marker_is_no_state(tmp_path):
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "model.safetensors").write_bytes(b"partial")
    assert state_dir.recover(tmp_path / "last") is None
    assert state_dir.read_marker(tmp_path / "last") is None
