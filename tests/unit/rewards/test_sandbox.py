"""The code sandbox against real hostile programs: real subprocesses, real rlimits, no mocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from readme import ROOT

from dist_ft.cli import main
from dist_ft.rewards import sandbox
from dist_ft.rewards.sandbox import SandboxUnavailable, code_tests, extract_code, run_python


def _unavailable() -> str | None:
    """Why code cannot be sandboxed here (bwrap missing or denied namespaces), or None."""
    try:
        sandbox.check()
    except SandboxUnavailable as e:
        return str(e)
    return None


# Where .ci/run could not install bubblewrap the tests that run code skip, saying why (as the
# SLURM tests do); the refusal itself is tested everywhere.
UNAVAILABLE = _unavailable()
needs_bwrap = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


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


@needs_bwrap
def test_correct_code_passes_and_wrong_code_scores_the_exact_share():
    tests = ["assert f(2) == 4", "assert f(3) == 9", "assert f(0) == 0", "assert f(-1) == 1"]
    good = run_python("def f(x):\n    return x * x", tests)
    assert good.passed == [True] * 4 and good.reward == 1.0 and good.error is None
    bad = run_python("def f(x):\n    return x + x", tests)
    assert bad.passed == [True, False, True, False] and bad.reward == 0.5
    assert bad.error.startswith("test 1: AssertionError")
    assert run_python("def f(x) return", tests).reward == 0.0  # a syntax error fails every test


@needs_bwrap
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


@needs_bwrap
def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", ["pass"], timeout_s=1.0, cpu_s=30)
    assert time.monotonic() - start < 1.0 + 3.0
    assert result.timed_out and result.error == "timeout" and result.reward == 0.0


@needs_bwrap
def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass", ["pass"], timeout_s=20.0, cpu_s=1)
    assert not result.timed_out and result.error == "cpu" and result.passed == [False]


@needs_bwrap
@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(4 * 1024**3)", "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"],
)
def test_memory_bomb_is_stopped_by_the_address_space_limit(bomb):
    result = run_python(bomb + "\ndef f():\n    return 1", ["assert f() == 1"], memory_mb=128)
    assert result.passed == [False] and result.error == "memory" and not result.timed_out
    assert run_python("def f():\n    return 1", ["assert f() == 1"]).reward == 1.0


@needs_bwrap
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


@needs_bwrap
def test_a_child_that_leaves_the_session_dies_with_the_sandbox():
    tag = b"987.6543210"  # a unique argv to find the escapee by
    escape = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '{tag.decode()}'])\ntime.sleep(0.3)"
    )
    assert run_python(escape, ["pass"]).passed == [True]
    assert _gone(lambda _, cmdline: tag in cmdline)


@needs_bwrap
def test_no_connection_reaches_a_port_the_parent_listens_on():
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
    assert "ConnectionRefusedError" in result.error  # its own loopback, where nothing listens


@needs_bwrap
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
    assert passed == [True, True, True]


@needs_bwrap
def test_writing_a_file_past_the_size_limit_fails():
    tests = [
        "open('small.bin', 'wb').write(b'x' * 1000)",
        "open('big.bin', 'wb').write(b'x' * (100 * 1024**2))",
    ]
    result = run_python("pass", tests, file_mb=16)
    assert result.passed == [True, False] and "File too large" in result.error


@needs_bwrap
def test_writes_outside_the_workspace_fail_or_vanish(tmp_path):
    # /tmp inside is a private tmpfs: the write works there and never reaches the host's /tmp
    escape = f"/tmp/sandbox-escape-{os.getpid()}-{time.monotonic_ns()}"
    tests = [
        f"open('{escape}', 'w').write('x')",
        "open('/usr/evil', 'w')",
        "open('/evil', 'w')",
        "open('/workspace/kept.txt', 'w').write('out')",
        "open('/tmp/big', 'wb').write(b'x' * (20 * 1024**2))",  # over file_mb, also on the tmpfs
        "open('/dev/shm/x', 'w')",  # bwrap's own tmpfs mounts are read-only too
        "open('/dev/null', 'w').write('x')",
    ]
    result = run_python("pass", tests, workspace=tmp_path, file_mb=16)
    assert result.passed == [True, False, False, True, False, False, True]
    assert not os.path.exists(escape)
    assert (tmp_path / "kept.txt").read_text() == "out"


@needs_bwrap
def test_system_files_outside_the_allow_list_cannot_be_read(tmp_path):
    world_readable = tmp_path / "host.txt"  # a host file any user may read, outside the view
    world_readable.write_text("host data")
    world_readable.chmod(0o644)
    system = ["/etc/passwd", "/etc/shadow", "/etc/hostname", "/root/.bashrc", "/var/log"]
    hidden = [p for p in system if os.path.exists(p)]
    assert "/etc/passwd" in hidden  # the probes below would prove nothing on a bare host
    probes = [f"assert not os.path.exists({p!r})" for p in [*hidden, __file__, str(world_readable)]]
    code = "import os\nimport json"  # the standard library still imports
    result = run_python(code, [*probes, "assert sorted(os.listdir('/tmp')) == []"])
    assert result.passed == [True] * (len(probes) + 1), result.error


@needs_bwrap
def test_the_workspace_holds_the_code_s_inputs_and_outputs(tmp_path):
    (tmp_path / "data.txt").write_text("3 4")
    code = "n = sum(map(int, open('data.txt').read().split()))\nopen('sum.txt', 'w').write(str(n))"
    tests = ["import os\nassert os.getcwd() == '/workspace' == os.environ['HOME']"]
    assert run_python(code, tests, workspace=tmp_path).passed == [True]
    assert (tmp_path / "sum.txt").read_text() == "7"
    with pytest.raises(
        NotADirectoryError, match=r"^sandbox workspace /.*/missing is not a directory$"
    ):
        run_python("pass", ["pass"], workspace=tmp_path / "missing")


@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    """A PATH without bwrap on it, as on a machine where bubblewrap is not installed."""
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._bwrap.cache_clear()
    yield
    sandbox._bwrap.cache_clear()


NO_BWRAP = (
    "the code sandbox needs bubblewrap (bwrap), not found: install bubblewrap "
    "(Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
)


def test_without_bwrap_nothing_runs_and_the_error_says_how_to_install_it(no_bwrap):
    with pytest.raises(SandboxUnavailable) as e:
        run_python("open('/tmp/ran', 'w')", ["pass"])
    assert str(e.value) == NO_BWRAP
    with pytest.raises(SandboxUnavailable):
        code_tests([""], ["x = 1"], [json.dumps(["pass"])])


def test_a_run_scored_by_code_tests_is_refused_before_the_model_loads(no_bwrap, capsys):
    overrides = ["reward.functions=[{name: code_tests}]", "run.output_dir=unused"]
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err == f"dist-ft: error: reward.functions[0].name: code_tests: {NO_BWRAP}\n"


def test_extract_code_takes_the_last_python_block():
    two = "Try:\n```python\nx = 1\n```\nBetter:\n```\nx = 2\n```\n```bash\nrm -rf /\n```"
    assert extract_code(two) == "x = 2"
    assert extract_code("no fences\nx = 3") == "no fences\nx = 3"
    assert extract_code("```py\nx = 4\n") == "x = 4"  # generation stopped before the fence


@needs_bwrap
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
        # one test snippet as a bare JSON string: a list is required, even of one
        ('"assert f(1) == 2"', r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        ("[]", r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        ('["ok", 3]', r"sample 1: answer must be a non-empty JSON list of test snippets$"),
        (None, r"sample 1: answer must be a non-empty JSON list of test snippets$"),
    ],
)
def test_code_tests_names_the_sample_with_a_malformed_answer(bad, reason):
    answers = [json.dumps(["pass"]), bad]
    with pytest.raises(ValueError, match=reason):
        code_tests(["", ""], ["x = 1", "x = 1"], answers)
