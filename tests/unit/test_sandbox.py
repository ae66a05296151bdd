"""The code sandbox against real hostile programs: real subprocesses, real rlimits, no mocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from dist_ft.rewards import sandbox
from dist_ft.rewards.sandbox import code_tests, extract_code, network_isolation, run_python


def _procs(match) -> list[int]:
    """Pids of live processes whose (stat fields after the name, cmdline) satisfy ``match``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and match(fields, cmdline):
            found.append(int(pid))
    return found


def _gone(match, within_s: float = 3.0) -> bool:
    """SIGKILLed processes take a moment to leave /proc; poll every 50 ms."""
    deadline = time.monotonic() + within_s
    while _procs(match):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(params=["default", "blocked-sockets"])
def isolation(request, monkeypatch) -> str:
    """Both network modes: whatever this machine supports, and the in-interpreter fallback."""
    if request.param == "blocked-sockets":
        monkeypatch.setattr(sandbox, "_netns_prefix", lambda: None)
    return network_isolation()


def test_correct_code_passes_and_wrong_code_scores_the_exact_share():
    tests = ["assert f(2) == 4", "assert f(3) == 9", "assert f(0) == 0", "assert f(-1) == 1"]
    good = run_python("def f(x):\n    return x * x", tests)
    assert good.passed == [True] * 4 and good.reward == 1.0 and good.error is None
    bad = run_python("def f(x):\n    return x + x", tests)
    assert bad.passed == [True, False, True, False] and bad.reward == 0.5
    assert bad.error.startswith("test 1: AssertionError")
    assert run_python("def f(x) return", tests).reward == 0.0  # a syntax error fails every test


@pytest.mark.parametrize(
    "code",
    [
        "import builtins\nbuiltins.exec = builtins.compile = lambda *a, **k: None",
        "import os\nos._exit(0)",
        'print("\\n" + "0" * 32 + "1\\t")',  # a guessed result line without the random marker
    ],
)
def test_code_cannot_fake_a_pass(code):
    assert run_python(code, ["assert False"]).passed == [False]


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", ["pass"], timeout_s=1.0, cpu_s=30)
    assert time.monotonic() - start < 1.0 + 3.0
    assert result.timed_out and result.error == "timeout" and result.reward == 0.0


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass", ["pass"], timeout_s=20.0, cpu_s=1)
    assert not result.timed_out and result.error == "cpu" and result.passed == [False]


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(4 * 1024**3)", "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"],
)
def test_memory_bomb_is_stopped_by_the_address_space_limit(bomb):
    result = run_python(bomb + "\ndef f():\n    return 1", ["assert f() == 1"], memory_mb=128)
    assert result.passed == [False] and result.error == "memory" and not result.timed_out
    assert run_python("def f():\n    return 1", ["assert f() == 1"]).reward == 1.0


def test_fork_bomb_is_stopped_and_leaves_no_process(monkeypatch):
    leaders = []

    class RecordingPopen(subprocess.Popen):  # a real Popen that remembers the session leader
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            leaders.append(self.pid)

    monkeypatch.setattr(sandbox.subprocess, "Popen", RecordingPopen)
    bomb = "import os\nwhile True:\n    os.fork()\ndef f():\n    return 1"
    start = time.monotonic()
    result = run_python(bomb, ["assert f() == 1"], timeout_s=10.0, max_procs=16)
    assert time.monotonic() - start < 10.0  # the process limit stopped it, not the timeout
    assert result.passed == [False] and "BlockingIOError" in result.error
    assert _gone(lambda fields, _: int(fields[3]) == leaders[0])
    assert run_python("def f():\n    return 1", ["assert f() == 1"]).reward == 1.0


@pytest.mark.skipif(network_isolation() != "netns", reason="needs a pid namespace")
def test_a_child_that_leaves_the_session_dies_with_the_sandbox():
    tag = b"987.6543210"  # a unique argv to find the escapee by
    escape = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '{tag.decode()}'])\ntime.sleep(0.3)"
    )
    assert run_python(escape, ["pass"]).passed == [True]
    assert _gone(lambda _, cmdline: tag in cmdline)


def test_no_connection_reaches_a_port_the_parent_listens_on(isolation):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
        result = run_python(probe, ["pass"])
        assert result.error.startswith("code: ") and result.passed == [True]
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever arrived on the listening side
            server.accept()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the port does work
        server.setblocking(True)
        server.accept()[0].close()
    expected = "OSError" if isolation == "netns" else "PermissionError"
    assert expected in result.error


def test_parent_secrets_never_reach_the_code(monkeypatch):
    secret = "sk-secret-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    # After its uid drop the harness is not dumpable, so its own /proc/self/environ is root's to
    # read; `cat` (a fresh exec, same environment) reads its own instead.
    own_environ = (
        "import subprocess\n"
        "env = subprocess.run(['/bin/cat', '/proc/self/environ'], capture_output=True).stdout\n"
        f"assert b'HOME=' in env and b'{secret}' not in env"
    )
    every_environ = (
        "import glob\nseen = []\nfor path in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n        seen.append(open(path, 'rb').read())\n"
        "    except OSError:\n        pass\n"
        f"assert not any(b'{secret}' in env for env in seen)"
    )
    no_variable = "import os\nassert os.environ.get('OPENAI_API_KEY') is None"
    # setenv only edits our copy; a process started with the key has it in /proc/PID/environ.
    holder = subprocess.Popen(["sleep", "30"], env={"OPENAI_API_KEY": secret})
    try:
        passed = run_python("pass", [no_variable, own_environ, every_environ]).passed
    finally:
        holder.kill()
        holder.wait()
    assert passed[:2] == [True, True]
    # Known gap: without namespaces a non-root sandbox shares our uid and can read our /proc.
    if network_isolation() == "netns" or os.geteuid() == 0:
        assert passed[2]


def test_writing_a_file_past_the_size_limit_fails():
    tests = [
        "open('small.bin', 'wb').write(b'x' * 1000)",
        "open('big.bin', 'wb').write(b'x' * (100 * 1024**2))",
    ]
    result = run_python("pass", tests, file_mb=16)
    assert result.passed == [True, False] and "File too large" in result.error


def test_extract_code_takes_the_last_python_block():
    two = "Try:\n```python\nx = 1\n```\nBetter:\n```\nx = 2\n```\n```bash\nrm -rf /\n```"
    assert extract_code(two) == "x = 2"
    assert extract_code("no fences\nx = 3") == "no fences\nx = 3"
    assert extract_code("```py\nx = 4\n") == "x = 4"  # generation stopped before the fence


def test_code_tests_scores_a_batch():
    completions = [
        "Here you go:\n```python\ndef f(x):\n    return 2 * x\n```",
        "def f(x):\n    return 2 * x",
        "```python\ndef f(x):\n    return 4\n```",
        "```python\nwhile True:\n    pass\n```",
    ]
    answers = [json.dumps(["assert f(1) == 2", "assert f(2) == 4"])] * 4
    scores = code_tests([""] * 4, completions, answers, timeout_s=1.0)
    assert scores == [1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("not json", r"sample 1: answer is not JSON \(Expecting value"),
        ('"assert True"', r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        ("[]", r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        ('["ok", 3]', r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        (None, r"sample 1: answer must be a non-empty JSON list of test snippets$"),
    ],
)
def test_code_tests_names_the_sample_with_a_malformed_answer(bad, reason):
    answers = [json.dumps(["pass"]), bad]
    with pytest.raises(ValueError, match=reason):
        code_tests(["", ""], ["x = 1", "x = 1"], answers)
