"""Helpers the tests share (fixtures stay in conftest.py): configs and specs for the tiny model,
finished-run layouts, damaged files, DPO batches, Adam-step comparisons, and the process and port
bookkeeping of the Ray and signal tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    import torch


def build(tiny_path: str, *overrides: str):
    """The RolloutSpec and LearnerSpec of a config with ``overrides``."""
    from dist_ft.config import load_config
    from dist_ft.run.specs import component_specs

    cfg = load_config(None, ["run.wandb=disabled", *overrides])
    return cfg, *component_specs(cfg, tiny_path)


def make_run(out: Path, *overrides: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A finished run's directory, and its policy (base + trained set) for reference logits:
    the real output layout (``prepare_output_dir``'s ``config.yaml``, the final weights by
    ``save_artefact``, which ``Learner.save_pretrained`` calls), with the trainable tensors
    moved by a seeded draw in place of training steps."""
    import torch

    from dist_ft.config import load_config
    from dist_ft.model.loading import load_policy, resolve_model_path
    from dist_ft.model.weights import save_artefact
    from dist_ft.run.outputs import prepare_output_dir

    cfg = load_config(None, ["run.wandb=disabled", "peft.r=4", f"run.output_dir={out}", *overrides])
    run = prepare_output_dir(cfg)
    base = resolve_model_path(cfg.model.path, cfg.model.tiny)
    policy = load_policy(base, cfg.model.dtype, cfg.peft, torch.device("cpu")).eval()
    # Stand-in for training: every trainable tensor moves (LoRA's B, BitFit's added biases and
    # the bottleneck's up projection start at 0, so the policy differs from the base after)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    final = "model" if cfg.peft.method.value == "none" else "adapter"
    save_artefact(policy, run / final, cfg.peft)
    return run, policy


def corrupt(file: Path, value: float, seal: bool) -> None:
    """Overwrite the first float32 of the first tensor in a safetensors ``file`` with ``value``
    (a flipped exponent), and with ``seal`` re-write the directory's manifest as a run whose
    training diverged would have: then only the values can tell."""
    import json
    import struct

    from dist_ft.run.artefacts import seal as write_seal

    data = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    first = min(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
    )
    assert first["dtype"] == "F32"
    at = 8 + header_len + first["data_offsets"][0]
    data[at : at + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(data))
    if seal:
        write_seal(file.parent)


def dpo_batch(tiny_path: str, pairs: int, seed: int = 0):
    """``pairs`` preference pairs of the built-in letter task, as a DPO batch (pair i = group
    i, chosen row first), with answers of unequal lengths and reference logprobs that differ
    from the initial policy's (so the loss is not at its symmetric point)."""
    import torch

    from dist_ft.data import prepare_preferences
    from dist_ft.model.loading import load_tokenizer
    from dist_ft.recipes.sft_dpo import demo_pair_rows, make_batch, with_reference

    tok = load_tokenizer(tiny_path)
    rows = demo_pair_rows(pairs, seed)
    for i, r in enumerate(rows):  # unequal lengths: sequence sums differ from means
        r["chosen"], r["rejected"] = r["chosen"][: 1 + i % 4], r["rejected"][: 4 - i % 3]
    prepared = prepare_preferences(
        rows, tok, source="test", template="plain", plain_template="{prompt}"
    )
    groups = [[p.chosen, p.rejected] for p in prepared.pairs]
    batch = make_batch(groups, tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    lengths = (batch.episode_mask != 0).sum(-1).tolist()  # [N] episode tokens per row
    return with_reference(batch, [-(torch.rand(n, generator=g) * 3) for n in lengths])


def load_learner_weights(worker, learner) -> str:
    """Debug mode's sync of one worker: ``learner``'s export, published in-process, loaded
    and read back; returns the worker's fingerprint."""
    from dist_ft.sync.inprocess import InProcessTransport

    transport = InProcessTransport()
    update = transport.publish(learner.version, learner.export_weights())
    return worker.set_weights(update, transport, read_back=True)


def assert_adam_close(got, expected, lr: float, name: str = "") -> None:
    """Two AdamW runs that should agree (another ZeRO stage, another rank count): ``got``
    against ``expected``, held to 1e-5, but for a rare few elements held to lr / 10.

    Adam's first update is lr * g / (|g| + eps), eps = 1e-8. Where |g| >> eps an element moves
    by ~lr and a summation-order error in g barely shows. Where g is near eps the update is a
    steep function of g, and two summation orders of so small a sum move it visibly (seen: a
    QLoRA element, |g| ~ 7e-9, off by 6.6e-5; a LoRA one, |g| ~ 2e-8, off by 1.4e-5; a BitFit
    bias, 1.1e-5 after two steps). A real difference (a wrong normaliser, a dropped rank) moves
    every element by about lr.
    """
    diff = (got - expected).abs()
    loose = diff > 1e-5
    worst = float(diff.max()) if diff.numel() else 0.0
    assert float(loose.float().mean()) <= 0.02 and worst <= 0.1 * lr, (
        name,
        int(loose.sum()),
        diff.numel(),
        worst,
    )


def terminal_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts as a terminal's Ctrl-C would. A shell
    without job control (a CI script, ``cmd &``) starts its children with SIGINT ignored, and
    Python then never raises KeyboardInterrupt: a user at a terminal has the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def session_procs(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (what a `ray start` run as its leader left running)."""
    procs = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):  # exited meanwhile
            if os.getsid(p.pid) == sid:
                procs.append(p)
    return procs


def stop_session(sid: int) -> None:
    """Kill what `ray start` (session leader ``sid``) spawned: every process of that session
    and their descendants (a job's entrypoint gets a session of its own)."""
    procs: dict[int, psutil.Process] = {}
    for p in session_procs(sid):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            procs.update({c.pid: c for c in [p, *p.children(recursive=True)]})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(procs.values()), timeout=30)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ray_node(argv: list[str], sessions: list[int], env: dict[str, str] | None = None) -> None:
    """``ray start ARGV`` in a session of its own, appended to ``sessions`` before it can
    fail: its daemons keep that session, so ``stop_session`` stops this node and nothing else
    on the machine."""
    p = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    sessions.append(p.pid)
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out[-3000:]


def readme_example() -> str:
    """The python block after the README's ``env-example`` marker (an Environment)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- env-example[^>]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "README has no env-example block"
    return match.group(1)
