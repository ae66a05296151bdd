"""status.json, SIGTERM/SIGINT between steps, and checkpoints that fail or are damaged (#20)."""

import json
import os
import signal
import socket
import subprocess

import pytest

from dist_ft.run import checkpoint, runstatus
from dist_ft.run.runstatus import Interrupted, RunStatus


def test_a_signal_inside_a_step_waits_for_its_end_and_a_second_one_does_not(tmp_path):
    status = RunStatus(tmp_path, 0, 10)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's if a test ran ray.init here
    status.handle_signals()
    try:
        finished = []
        with pytest.raises(Interrupted) as e, status.step():
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("the step's bookkeeping")
        assert finished == ["the step's bookkeeping"]
        assert e.value.signum == signal.SIGTERM and e.value.args == ("SIGTERM",)
        assert isinstance(e.value, KeyboardInterrupt)  # handled wherever Ctrl-C is

        with pytest.raises(Interrupted):  # outside a step: at once
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a point where Python runs the handler
        with pytest.raises(Interrupted), status.step():  # a second one inside: at once
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("the second signal did not stop the step")
        with status.step():  # and nothing is left pending for the next step
            pass
    finally:
        status.restore_signals()
    assert signal.getsignal(signal.SIGTERM) == before


def test_status_tells_a_live_run_from_one_that_vanished(tmp_path):
    status = RunStatus(tmp_path, 0, 10)
    status.update(3)
    host = socket.gethostname()
    assert (
        runstatus.unfinished(tmp_path)
        == f"is still running (pid {os.getpid()} on {host}, step 3 of 10)"
    )

    gone = subprocess.Popen(["true"])
    gone.wait()
    row = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "status.json").write_text(json.dumps({**row, "pid": gone.pid}))
    assert runstatus.unfinished(tmp_path) == (
        f"ended without finishing (killed or crashed at step 3; pid {gone.pid} on {host} is gone)"
    )
    status.update(4, runstatus.INTERRUPTED, "SIGTERM")
    assert runstatus.unfinished(tmp_path) == "was interrupted at step 4 (SIGTERM)"
    status.update(5, runstatus.FINISHED)
    assert runstatus.unfinished(tmp_path) is None
    assert runstatus.unfinished(tmp_path / "no-such-run") is None  # older runs: no status.json


def write(root, step: int, keep: int = 3) -> None:
    with checkpoint.writing(root, step, keep) as tmp:
        (tmp / "state.bin").write_bytes(bytes(range(256)) * step)


def test_resume_falls_back_past_a_damaged_commit_and_refuses_when_all_are(tmp_path):
    root = checkpoint.root(tmp_path)
    for step in (1, 2, 3):
        write(root, step)
    os.truncate(root / "step-00000003" / "COMMIT", 40)
    with pytest.warns(UserWarning, match="step-00000003: its COMMIT file is unreadable"):
        assert checkpoint.find_resume(tmp_path, "auto") == root / "step-00000002"
    (root / "step-00000002" / "COMMIT").write_text('{"files": ["not", "a", "dict"]}')
    os.truncate(root / "step-00000001" / "state.bin", 3)
    with pytest.warns(UserWarning), pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.find_resume(tmp_path, "auto")
    assert "every checkpoint in" in str(e.value)
    assert "(step-00000001, step-00000002, step-00000003;" in str(e.value)


def test_a_full_disk_mid_write_is_named_and_leaves_no_partial(tmp_path):
    root = checkpoint.root(tmp_path)
    write(root, 1)
    with pytest.raises(checkpoint.CheckpointError) as e, checkpoint.writing(root, 2, 3) as tmp:
        (tmp / "half").write_bytes(b"x")
        with open("/dev/full", "wb") as f:  # the kernel's own ENOSPC
            f.write(b"x")
            f.flush()
    assert str(e.value).startswith(f"no space left on {root} writing the checkpoint of step 2")
    assert "kept: step-00000001" in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    checkpoint.verify(root / "step-00000001")

    # any other failure: raised as it is, and no partial left either
    with pytest.raises(ValueError, match="not a disk"), checkpoint.writing(root, 2, keep=3):
        raise ValueError("not a disk")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
