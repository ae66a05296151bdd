"""The vLLM engine process behind ``rollout.generator: vllm`` (``rollout/vllm_engine.py``).

It runs under the interpreter that has vLLM (``rollout.vllm.python``: its own environment,
``.venv-vllm``, where vLLM's transformers pin differs from the project's), started by
``VLLMGenerator`` with ``runpy`` so that nothing of dist_ft is imported here: only the standard
library, torch, safetensors and vLLM. It listens on a Unix socket in the generator's private
directory (authkey read from stdin), the generator connects, and it answers one request at a
time: ``(method, kwargs)`` in, ``("ok", result)`` or ``("error", traceback)`` out. Weights travel
as safetensors files in that directory.

One engine per rollout worker, tensor parallel 1, its engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``apply_model`` then reaches the model object itself,
which the weight loads and the read-back need.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from multiprocessing.connection import Listener
from typing import Any


def _plain_cpu_linear(layer: Any, remove_weight: bool) -> None:
    """Full fine-tuning on CPU: keep every linear weight a plain tensor that F.linear reads.

    vLLM's CPU path repacks linear weights for oneDNN at load time and drops the originals
    (``remove_weight``); the packed copy is then what computes, so a later in-place load would
    leave the engine sampling from the old weights with no error, and nothing could be read
    back. The LM head keeps its weight but computes from a packed copy too.
    """
    import torch.nn.functional as F

    layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)


class Engine:
    def __init__(self, options: dict[str, Any]) -> None:
        import torch
        from vllm import LLM

        self.full = options["full"]
        if self.full and options["device"] == "cpu":
            import vllm.model_executor.layers.utils as vllm_layer_utils

            vllm_layer_utils.dispatch_cpu_unquantized_gemm = _plain_cpu_linear
        lora = {}
        if options["lora_rank"]:
            lora = {"enable_lora": True, "max_lora_rank": options["lora_rank"], "max_loras": 1}
        self.llm = LLM(
            model=options["model_path"],
            dtype=options["dtype"],
            seed=options["seed"],
            max_model_len=options["max_model_len"],
            enforce_eager=options["device"] == "cpu",
            trust_remote_code=False,
            # temperature-scaled, untruncated at top_p=1: what the learner recomputes
            logprobs_mode="processed_logprobs",
            gpu_memory_utilization=options["gpu_memory_utilization"],
            **lora,
        )
        self.torch = torch
        self.temperature = options["temperature"]
        self.top_p = options["top_p"]
        self.lora_request: Any = None
        self.tokenizer = self.llm.get_tokenizer()

    # ------------------------------------------------------------------ sampling
    def sample(
        self, contexts: list[list[int]], n: int, budgets: list[int], seed: int | None
    ) -> list[list[tuple[list[int], list[float]]]]:
        """``n`` continuations of each token context, context i's at most ``budgets[i]``
        tokens: per context, per sample, (token ids as sampled, each one's logprob)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=budget,
                logprobs=0,  # the sampled token's own
                seed=None if seed is None else seed + i,
                detokenize=False,
            )
            for i, budget in enumerate(budgets)
        ]
        prompts = [TokensPrompt(prompt_token_ids=c) for c in contexts]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for out in outs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
                samples.append((ids, lps))
            result.append(samples)
        return result

    # ------------------------------------------------------------------ weights
    def load_lora(self, path: str, version: int) -> None:
        """A synced adapter as a new LoRA version (the base stays loaded); the previous one is
        dropped. Loaded and activated now, so that a read-back sees it in the layers."""
        from vllm.lora.request import LoRARequest

        old = self.lora_request
        self.lora_request = LoRARequest(f"v{version}", version + 1, path)
        self.llm.llm_engine.add_lora(self.lora_request)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        self.sample([[self.tokenizer.eos_token_id or 0]], 1, [1], seed=0)  # into its slot

    def load_full(self, path: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)

        def load(model: Any) -> None:
            model.load_weights(iter(tensors.items()))

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed by the old weights

    def read_back(self, path: str) -> None:
        """What the engine's layers compute with, under HF names, written to ``path``: the
        active LoRA's A and B (B with vLLM's scaling folded in) from the layers' slots, or
        every weight, fused projections split and vocabulary padding cut."""
        from safetensors.torch import save_file

        if self.full:
            (held,) = self.llm.apply_model(_full_weights)
        else:
            held = self._lora_weights()
        save_file({k: v.contiguous() for k, v in held.items()}, path)

    def _lora_weights(self) -> dict[str, Any]:
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        manager = runner.lora_manager._adapter_manager
        request = self.lora_request
        slot = manager.lora_index_to_id.index(request.lora_int_id)
        rank = manager._registered_adapters[request.lora_int_id].rank
        packed = getattr(manager.model, "packed_modules_mapping", {})
        held = {}
        for name, module in manager.modules.items():
            # linear layers hold a tuple of [slots, 1, rank, in] stacks, one per packed part;
            # embeddings (which a dist_ft adapter never targets) one tensor
            if not isinstance(getattr(module, "lora_a_stacked", None), tuple):
                continue
            prefix, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, [leaf])
            for part, a, b in zip(parts, module.lora_a_stacked, module.lora_b_stacked):
                a_rk, b_or = a[slot, 0, :rank, :], b[slot, 0, :, :rank]
                if not b_or.any() and not a_rk.any():
                    continue  # a module this adapter does not touch
                hf = f"base_model.model.{prefix}.{part}"
                held[f"{hf}.lora_A.weight"] = a_rk.detach().cpu().clone()
                held[f"{hf}.lora_B.weight"] = b_or.detach().cpu().clone()
        return held


def _full_weights(model: Any) -> dict[str, Any]:
    """Every weight of a vLLM model under HF names (runs inside the engine's worker)."""
    packed = getattr(model, "packed_modules_mapping", {})
    modules = dict(model.named_modules())
    held = {}
    for name, p in model.named_parameters():
        prefix, _, leaf_param = name.rpartition(".")
        module_path, _, leaf = prefix.rpartition(".")
        module = modules[prefix]
        t = p.detach().cpu()
        org_vocab = getattr(module, "org_vocab_size", None)
        if org_vocab is not None:  # vocabulary rows padded to a multiple of 64
            t = t[:org_vocab]
        if leaf in packed:
            sizes = list(module.output_sizes)
            for part, piece in zip(packed[leaf], t.split(sizes, dim=0)):
                held[f"{module_path}.{part}.{leaf_param}"] = piece.clone()
        else:
            held[name] = t.clone()
    return held


def main() -> None:
    address, options_json = sys.argv[1], sys.argv[2]
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    options = json.loads(options_json)
    # listening first: the generator connects while the engine loads, and sees it fail
    conn = Listener(address, family="AF_UNIX", authkey=authkey).accept()
    try:
        engine = Engine(options)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, kwargs = conn.recv()
        except EOFError:  # the generator is gone
            return
        if method == "close":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(engine, method)(**kwargs)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
