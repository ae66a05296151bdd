"""Run model-written Python against test snippets in a locked-down child process.

Model code can loop forever, eat memory, fork, fill the disk, read the machine's files or phone
home, and a reward has to survive all of it, so the code never runs in our interpreter. Layers,
outermost first:
- bubblewrap (``bwrap``): its own network (only its own loopback), pid, /proc, IPC and UTS
  namespaces, and a private filesystem view: read-only ``/usr`` and the interpreter's prefix, a
  private size-capped tmpfs ``/tmp``, the workspace as the only writable host directory
  (``/workspace`` inside), everything else read-only, and nothing else of the host: no ``/etc``
  (so no password database), no home directories, no host ``/tmp``;
- a fresh session, SIGKILLed as a whole at the wall-clock timeout;
- rlimits on CPU seconds, address space, file size, process count and core dumps;
- uid ``nobody`` when we are root, because root ignores RLIMIT_NPROC and can read every secret;
- a fixed environment, so the parent's API keys never reach the code.
The child is ``python -I -S``: standard library only, nothing from the venv or user site.

Without bwrap, or where it cannot create namespaces (a container whose seccomp profile forbids
them), every call raises :class:`SandboxUnavailable` with how to fix it; nothing runs. There is
no weaker fallback on purpose: the older one (sockets blocked inside the interpreter, the host
filesystem in view) let code read the machine's files and a same-uid child read our
/proc/PID/environ, and a hand-built mount namespace (``unshare`` plus bind mounts) would redo
bwrap's work less carefully while needing the very namespaces whose absence is the failure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing has it from 3.11; the package runs on 3.10

NOBODY = 65534
_TAIL_BYTES = 64 * 1024  # only this much of the child's stdout/stderr is ever read back
_PY_FENCES = ("", "py", "python", "python3")

# Runs as `python -I -S -c`: reads its job, locks itself down, then runs code and tests. Every
# name it needs after the user code starts is bound beforehand, so code that patches builtins
# or modules (say `builtins.exec = ...`) cannot turn failed tests into passes.
_HARNESS = r"""
def main():
    import json, os, resource, signal, sys
    job = json.load(sys.stdin)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the job holds the marker: nothing re-reads it
    for name, (soft, hard) in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    if job["uid"] is not None:
        # /root is often 0700: keep the stdlib importable after the drop via fds opened as root
        fds = {d: f"/proc/self/fd/{os.open(d, os.O_RDONLY)}" for d in sys.path if os.path.isdir(d)}
        def moved(path):
            return next((fd + path[len(d):] for d, fd in fds.items() if path.startswith(d)), path)
        sys.path[:] = fds.values()
        for mod in list(sys.modules.values()):
            if isinstance(getattr(mod, "__path__", None), list):
                mod.__path__[:] = map(moved, mod.__path__)
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    marker = job.pop("marker")
    write, exit_, getpid, MemErr = os.write, os._exit, os.getpid, MemoryError
    flush = sys.stdout.flush  # what the code printed goes out before the result line
    run, comp = exec, compile
    me, ns, errors = getpid(), {"__name__": "__main__"}, []
    sources = [("code", job["code"])] + [(f"test {i}", t) for i, t in enumerate(job["tests"])]
    for label, src in sources:
        try:
            run(comp(src, label, "exec"), ns)
            errors.append(None)
        except BaseException as e:
            name = e.__class__.__name__
            errors.append("memory" if isinstance(e, MemErr) else f"{label}: {name}: {e}")
        if getpid() != me:  # a fork made by the user code must not report results
            exit_(0)
    first = next((e for e in errors if e is not None), "")
    bits = "".join(["1" if e is None else "0" for e in errors[1:]])
    line = "\n" + marker + bits + "\t" + first.replace("\n", " ")[:500] + "\n"
    try:
        flush()
    except BaseException:  # a closed or broken stdout: the result line still goes out
        pass
    write(1, line.encode(errors="replace"))
    exit_(0)
main()
"""


@dataclass(frozen=True)
class SandboxResult:
    """One run's verdict; ``error`` says why it failed, for logs, not for the reward."""

    passed: list[bool]  # one per test
    reward: float  # share of tests passed
    timed_out: bool
    error: str | None  # first failure, "timeout", "memory", "cpu" or a stderr tail
    output: str = ""  # what the code and tests printed (the last 64 KiB of stdout, at most)


class SandboxLimits(TypedDict, total=False):
    """The limits ``code_tests`` passes on to ``run_python`` (a reward's YAML kwargs)."""

    cpu_s: int
    memory_mb: int
    file_mb: int
    max_procs: int


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create namespaces here; the message says how to fix it."""


_INSTALL = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
)


def _host_view() -> list[str]:
    """bwrap arguments for the read-only allow-list Python needs: ``/usr``, the top-level
    ``/bin``, ``/lib``... as the host has them (symlinks into /usr where /usr is merged), and the
    interpreter's prefix and binary where they live outside /usr (pyenv, conda, a venv's base)."""
    args, covered = ["--ro-bind", "/usr", "/usr"], ["/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in (os.path.realpath(sys.base_prefix), os.path.dirname(_python())):
        if not any(path == c or path.startswith(c + "/") for c in covered):
            args += ["--ro-bind", path, path]
            covered.append(path)
    return args


def _private_tmp(size_mb: int) -> tuple[str, ...]:
    """bwrap arguments for a ``/tmp`` of its own: a tmpfs of ``size_mb``, writable by anyone."""
    return ("--perms", "1777", "--size", str(size_mb << 20), "--tmpfs", "/tmp")


# Last, once every mount point exists: bwrap's root and /dev are tmpfs owned by the sandbox's
# uid when we are not root, so without this code could fill memory with files outside /tmp's cap.
_READ_ONLY_ROOT = ("--remount-ro", "/dev", "--remount-ro", "/")


def _python() -> str:
    """The interpreter's real binary: a venv's ``bin/python`` is a symlink the sandbox lacks."""
    return os.path.realpath(sys.executable)


@functools.cache
def _bwrap() -> tuple[str, ...]:
    """The bwrap command up to the per-call mounts, checked once by running ``true`` in it.

    A fresh network namespace has only its own loopback, so nothing the host listens on (even
    on 127.0.0.1) is reachable; the pid namespace makes the whole tree die with its init; the
    private /proc hides our processes (and their environments). ``--as-pid-1`` makes the
    harness that init, bwrap's own child, so its CPU time reaches our ``wait4`` (under bwrap's
    reaper it would not). Root creates the namespaces without a user namespace and keeps its
    capabilities inside, so the harness can still drop to ``nobody``; anyone else needs a user
    namespace to create the others.
    """
    exe = shutil.which("bwrap")
    if exe is None:
        raise SandboxUnavailable(
            f"the code sandbox needs bubblewrap (bwrap), not found: {_INSTALL}"
        )
    user = () if os.geteuid() == 0 else ("--unshare-user",)
    cmd = (
        exe, *user, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--as-pid-1", "--die-with-parent", "--new-session",
        *_host_view(), "--dev", "/dev", "--proc", "/proc",
    )  # fmt: skip
    try:
        # with the per-call /tmp options too: an old bwrap without --size fails here, not later
        probe = subprocess.run(
            [*cmd, *_private_tmp(1), "true"], capture_output=True, text=True, timeout=30
        )
        last = probe.stderr.strip().rpartition("\n")[2]
        why = (last or f"exit {probe.returncode}") if probe.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    if why is not None:
        raise SandboxUnavailable(
            f"bwrap cannot create the code sandbox here ({why}): "
            "allow user namespaces (sysctl kernel.unprivileged_userns_clone=1; in a container, a "
            "seccomp profile that permits them)"
        )
    return cmd


def check() -> None:
    """Raise :class:`SandboxUnavailable` now, with the fix, if code cannot be sandboxed here."""
    _bwrap()


def _processes_of(uid: int) -> int:
    """How many processes ``uid`` owns now: RLIMIT_NPROC counts them all, not just ours."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # it may exit while we look
                n += os.stat(f"/proc/{pid}").st_uid == uid
    return n


def _kill_all(proc: subprocess.Popen, timed_out: bool) -> float:
    """SIGKILL everything the run started, reap the leader, and return the CPU seconds used.

    On a timeout bwrap's child, the harness (the pid namespace's init: the namespace dies with
    it), goes first, so bwrap reaps it; killed after bwrap it would be a zombie for a container
    init that may never reap. The group is signalled before its leader is reaped, so its id cannot
    have been recycled for an innocent process.
    """
    if timed_out:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for kid in kids:
            try:
                pidfd = os.pidfd_open(kid)  # pins the pid, so the parent check below holds
            except OSError:
                continue
            try:
                with open(f"/proc/{kid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        _wait_unreaped(proc.pid, 1.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # wait4's usage includes descendants reaped below the leader, i.e. the harness's.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _wait_unreaped(pid: int, seconds: float) -> bool:
    """True once ``pid`` has exited (left unreaped); polls every 10 ms, up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run_python(
    code: str,
    tests: list[str],
    *,
    workspace: str | os.PathLike[str] | None = None,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_mb: int = 16,
    max_procs: int = 32,
) -> SandboxResult:
    """Run ``code`` then each test snippet in one sandboxed child; a test passes if it raises
    nothing. ``max_procs`` counts threads too (Linux counts tasks), on top of what the sandbox
    uid already runs, and sandboxes running at once share it.

    ``workspace`` is the code's cwd and HOME, seen inside as ``/workspace``, and the only host
    directory it can write: files put there beforehand are its inputs and what it writes stays
    for the caller (as root, the directory and its contents are handed to ``nobody`` first).
    None: a fresh temporary directory, removed afterwards. ``/tmp`` inside is private and holds
    at most ``file_mb``. Raises :class:`SandboxUnavailable` where bwrap cannot run.
    """
    prefix = _bwrap()
    uid = NOBODY if os.geteuid() == 0 else None
    # A random marker on the result line, so printed output cannot pass as a result.
    marker = secrets.token_hex(16)
    nproc = _processes_of(os.getuid() if uid is None else uid) + max_procs
    rlimits = {
        "RLIMIT_CPU": (cpu_s, cpu_s),  # SIGKILL at the hard limit; pid 1 would ignore SIGXCPU
        "RLIMIT_AS": (memory_mb << 20,) * 2,
        "RLIMIT_FSIZE": (file_mb << 20,) * 2,  # caps files and the stdout/stderr files too
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_CORE": (0, 0),
    }
    job = {"code": code, "tests": tests, "marker": marker, "uid": uid, "rlimits": rlimits}
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryFile() as payload,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        if workspace is None:
            tmp = tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True)
            workspace = stack.enter_context(tmp)
        elif not os.path.isdir(workspace):
            raise NotADirectoryError(f"sandbox workspace {workspace} is not a directory")
        if uid is not None:
            for parent, dirs, files in os.walk(workspace):
                for name in ["", *dirs, *files]:
                    os.lchown(os.path.join(parent, name), uid, uid)
        payload.write(json.dumps(job).encode())
        payload.seek(0)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/workspace", "TMPDIR": "/tmp"}
        proc = subprocess.Popen(
            [
                *prefix, *_private_tmp(file_mb),
                "--bind", os.fspath(workspace), "/workspace", "--chdir", "/workspace",
                *_READ_ONLY_ROOT,
                _python(), "-I", "-S", "-c", _HARNESS,
            ],
            env=env, stdin=payload, stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
        timed_out = not _wait_unreaped(proc.pid, timeout_s)
        cpu_used_s = _kill_all(proc, timed_out)
        tails = []
        for f in (out, err):
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tails.append(f.read())
    at = tails[0].rfind(b"\n" + marker.encode())
    line = tails[0][at + 1 + len(marker) :].split(b"\n", 1)[0].decode(errors="replace")
    bits, _, reason = line.partition("\t")
    if at >= 0 and len(bits) == len(tests) and not timed_out:
        passed = [b == "1" for b in bits]
        error = reason or None
    else:
        passed = [False] * len(tests)
        if timed_out:
            error = "timeout"
        elif proc.returncode == 128 + signal.SIGKILL and cpu_used_s >= 0.9 * cpu_s:
            # RLIMIT_CPU's kill (bwrap exits 128 + the signal); the kernel's accounting of the
            # CPU time is a few ticks short of the limit it enforced
            error = "cpu"
        else:
            stderr = tails[1][-300:].decode(errors="replace").strip()
            error = f"exit {proc.returncode}: {stderr}"
    reward = sum(passed) / len(tests) if tests else 0.0
    printed = (tails[0][:at] if at >= 0 else tails[0]).decode(errors="replace")
    return SandboxResult(passed, reward, timed_out, error, printed)


def extract_code(completion: str) -> str:
    """The last ```python (or unlabelled) fenced block, else the whole completion.

    The last one, because models tend to sketch or show usage first and give the answer last.
    A block left open (generation stopped at the fence) still counts.
    """
    blocks: list[str] = []
    lines: list[str] = []
    lang = None
    for line in completion.splitlines():
        fence = line.strip()
        if lang is None and fence.startswith("```"):
            lang, lines = fence[3:].strip().lower(), []
        elif lang is not None and fence == "```":
            if lang in _PY_FENCES:
                blocks.append("\n".join(lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    if lang in _PY_FENCES:
        blocks.append("\n".join(lines))
    return blocks[-1] if blocks else completion


def code_tests(
    prompts: list[str],
    completions: list[str],
    answers: list[str | None],
    *,
    timeout_s: float = 5.0,
    **limits: Unpack[SandboxLimits],
) -> list[float]:
    """Share of each answer's tests (a JSON list of snippets) that the completion's code passes.

    A timeout or crash is a legitimate 0.0; a malformed answer is a data bug and raises.
    """
    suites = []
    for i, answer in enumerate(answers):
        try:
            tests = json.loads(answer) if answer is not None else None
        except json.JSONDecodeError as e:
            raise ValueError(f"sample {i}: answer is not JSON ({e})") from None
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"sample {i}: answer must be a non-empty JSON list of test snippets")
        suites.append(tests)
    # Threads only wait: each sandbox is its own process, so one per core keeps them all busy.
    workers = max(1, min(len(completions), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = pool.map(
            lambda c, t: run_python(extract_code(c), t, timeout_s=timeout_s, **limits),
            completions,
            suites,
        )
        return [r.reward for r in runs]
