"""``HFGenerator``: transformers ``generate`` on the local policy, with the behaviour logprobs.

Each prompt is run through the model once and its KV cache repeated for its G samples, so the
prompt is not recomputed G times (SmolLM2's chat prompts are ~33 tokens against 16 new ones).

The behaviour logprobs are the sampled tokens' logprobs under the temperature-scaled full
distribution (no top-p truncation), as the learner computes them
(:func:`dist_ft.model.logprobs.group_logprobs`), so the two agree at ratio 1:

- fp32: taken from the sampling pass's own raw logits. Its KV-cached decode agrees with the
  learner's full forward to <= 3.1e-5 per token (SmolLM2-135M, 4 x 4 samples, 16 tokens; 7e-6 on
  the tiny model) and the mean ratio to <= 5e-7, inside the 1e-5 the tests hold it to, and it
  saves a forward over every [prompt + completion] row.
- bf16 / fp16: one scoring forward with the learner's function on the learner's layout (each
  prompt once, then the completions against its cache). A token-by-token cached decode in bf16
  moves a token's logprob by up to 0.23 from the full forward (mean ratio off 1 by 3e-3 on
  SmolLM2; 3e-4 on the tiny model), and the same-dtype bound is 1e-5
  (tests/integration/test_dtypes.py); fp16, unmeasured, takes the same path.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from dist_ft.algos.common import token_logprobs
from dist_ft.model import onednn
from dist_ft.model.loading import DTYPES, load_policy, load_tokenizer
from dist_ft.model.logprobs import group_logprobs, shares_prompt_cache
from dist_ft.model.peft import reference_mode, use_adapter
from dist_ft.model.spec import HFModel, PeftMethod, PeftSpec
from dist_ft.model.weights import export_state, import_state, is_adapter
from dist_ft.rollout.base import Generation, GeneratorSpec, SampledTurn
from dist_ft.rollout.merged import MergedLoRA
from dist_ft.wire.batch import Span
from dist_ft.wire.packing import left_pad

if TYPE_CHECKING:
    from transformers import DynamicCache


class InverseCDFSample:
    """A transformers logits processor that samples: each row's next token is drawn from
    softmax(scores) by inverse CDF (one uniform per row against the cumulative distribution),
    and every other score is set to -inf, so greedy decoding picks the draw.

    ``torch.multinomial`` over SmolLM2's 49k vocabulary takes 18 ms a decode step for 16 rows
    on 2 CPU cores (its random number generation), this 0.8 ms: 9% of ``generate`` saved. The
    cumulative sum is float64 (as multinomial's CPU kernel accumulates): in float32 a token
    late in the vocabulary would get its probability only to the ulp of the sum, ~6e-8.
    """

    def __call__(self, input_ids: torch.Tensor, scores_NV: torch.Tensor) -> torch.Tensor:
        cdf_NV = torch.softmax(scores_NV.float(), dim=-1).cumsum(-1, dtype=torch.float64)
        u_N1 = torch.rand(len(cdf_NV), 1, dtype=cdf_NV.dtype, device=cdf_NV.device)
        # right=True: a token of probability 0 (a flat step of the CDF) is never drawn
        picked_N1 = torch.searchsorted(cdf_NV, u_N1 * cdf_NV[:, -1:], right=True)
        picked_N1 = picked_N1.clamp(max=cdf_NV.shape[-1] - 1)
        out_NV = torch.full_like(scores_NV, float("-inf"))
        return out_NV.scatter_(1, picked_N1, 0.0)


@dataclass(frozen=True)
class HFOptions:
    """The "hf" engine's own settings (``GeneratorSpec.options``)."""

    cpu_linear: Literal["onednn", "torch"] = "onednn"  # resources.cpu_linear
    merge_lora: bool = True  # rollout.merge_lora


class HFGenerator:
    model: HFModel  # declared here: an annotated self.model = ... would narrow it to nn.Module

    def __init__(self, spec: GeneratorSpec) -> None:
        options = spec.options if isinstance(spec.options, HFOptions) else HFOptions()
        self.device = torch.device(spec.device)
        self.tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
        self.model = load_policy(
            spec.model_path, spec.dtype, spec.peft, self.device, spec.trust_remote_code
        ).eval()
        self.adapter_only = is_adapter(self.model)
        self.dtype = DTYPES[spec.dtype]  # every weight, the adapter's too (models.hold_in_dtype)
        self.ref_model = None
        if spec.need_ref_logprobs and not self.adapter_only:
            # Full fine-tuning has no adapter to switch off: keep a frozen copy of the start.
            no_peft = PeftSpec(method=PeftMethod.NONE)
            self.ref_model = load_policy(
                spec.model_path, spec.dtype, no_peft, self.device, spec.trust_remote_code
            ).eval()
        if options.cpu_linear == "onednn" and self.device.type == "cpu":
            for model in (self.model, self.ref_model):
                if model is not None:
                    onednn.convert(model)
        self.need_ref = spec.need_ref_logprobs
        self.max_new_tokens = spec.max_new_tokens
        self.temperature = spec.temperature
        self.top_p = spec.top_p
        # see the module docstring: which dtypes may keep the sampling pass's logprobs
        self.logprobs_from_sampling = self.dtype == torch.float32
        self.shared_prefill = shares_prompt_cache(spec.peft)
        self.merged = None
        if (
            options.merge_lora
            and spec.peft.method is PeftMethod.LORA
            and self.logprobs_from_sampling
        ):
            self.merged = MergedLoRA(self.model)
        base = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        self.logits_to_keep = base._supports_logits_to_keep()
        from transformers import (
            LogitsProcessor,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(self.temperature)]
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        self.sampler = LogitsProcessorList([*warpers, InverseCDFSample()])

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        # load_state_dict converts dtypes silently: this worker would hold other bytes than the
        # learner sent, seen on Ray only at the next read-back (rollout.read_back_every).
        sent = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if sent - {self.dtype}:
            raise TypeError(
                f"weight sync sends {sorted(map(str, sent))} tensors to a rollout worker that "
                f"holds its policy in {self.dtype}: syncs must be cast to the rollout dtype "
                "before they are published (sync.to_rollout_dtype)"
            )
        import_state(self.model, tensors, self.adapter_only)

    def export_weights(self) -> dict[str, torch.Tensor]:
        return export_state(self.model, self.adapter_only)

    def share_frozen(self, donor: torch.nn.Module) -> None:
        """Debug mode: hold the learner's frozen tensors (the base, under a PEFT method) rather
        than a copy of the same bytes; under ``rollout.merge_lora`` the merged weights then
        exist only while a decode runs (:meth:`MergedLoRA.rebase`), not beside the learner's
        step. Only tensors equal in name, shape, dtype and device are taken (none from a ZeRO-3
        partition)."""
        theirs = {n: p for n, p in donor.named_parameters() if not p.requires_grad}
        layer_of = {}
        if self.merged is not None:
            layer_of = {id(m.base_layer.weight): i for i, m in enumerate(self.merged.layers)}
        for name, p in self.model.named_parameters():
            q = theirs.get(name)
            same = q is not None and (q.shape, q.dtype, q.device) == (p.shape, p.dtype, p.device)
            if p.requires_grad or not p.is_floating_point() or not same:  # 4-bit: left alone
                continue
            assert q is not None  # not same where the donor has no such tensor
            if id(p) in layer_of:
                assert self.merged is not None  # layer_of is empty without it
                self.merged.rebase(layer_of[id(p)], q.data)
            else:
                p.data = q.data

    def use_adapter(self, name: str) -> None:
        # the base stays loaded once; peft switches which adapter its layers add
        use_adapter(self.model, name)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int) -> Generation:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        group_ids = torch.arange(len(prompts)).repeat_interleave(n)  # [B*G]: rows i*n.. are i's
        # generate needs every sample's prompt; only the [B, P] table leaves this function.
        prompt_ids = enc["input_ids"][group_ids].to(self.device)  # [B*G, P]
        prompt_mask = enc["attention_mask"][group_ids].to(self.device)  # [B*G, P]
        with self.merged.decoding() if self.merged is not None else nullcontext():
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                past_key_values=self._prefill(enc["input_ids"], enc["attention_mask"], n),
                # InverseCDFSample draws the token and leaves it the only finite score: greedy
                # decoding then takes the draw (no top-k: the model's generation config is unused)
                do_sample=False,
                logits_processor=self.sampler,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                # the logits before any processor: the full distribution the learner recomputes
                output_logits=self.logprobs_from_sampling,
                return_dict_in_generate=True,
            )
        completion_ids, completion_mask = self._completion(out.sequences[:, prompt_ids.shape[1] :])
        # the learner's function on the learner's layout: one prompt row per group
        table = (enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        span = (group_ids, completion_ids, completion_mask)
        logprobs = self._behaviour(out, *table, *span, share=self.shared_prefill)
        ref_logprobs = None
        if self.need_ref:
            ref_logprobs = self.reference_logprobs(*table, *span, completion_mask)
        return Generation(
            prompt_ids=enc["input_ids"],
            prompt_mask=enc["attention_mask"],
            group_ids=group_ids,
            episode_ids=completion_ids,
            # Single-turn: every kept token (up to and including EOS) was sampled and is trained.
            episode_mask=(completion_mask * Span.TRAINED).to(torch.int8),
            logprobs=logprobs.float(),
            ref_logprobs=ref_logprobs,
            texts=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        )

    @torch.no_grad()
    def sample(self, contexts: list[list[int]], budgets: list[int]) -> list[SampledTurn]:
        """One model turn for each of N token contexts (multi-turn episodes, rollout/episodes.py):
        context i is continued by at most ``budgets[i]`` tokens, up to and including EOS, all
        rows in one ``generate`` call. The ids come back as sampled, with their behaviour
        logprobs (the same distribution as :meth:`generate`'s)."""
        ids_NP, mask_NP = left_pad(contexts, self.tokenizer.pad_token_id)
        n, width = ids_NP.shape
        ids_NP, mask_NP = ids_NP.to(self.device), mask_NP.to(self.device)
        with self.merged.decoding() if self.merged is not None else nullcontext():
            out = self.model.generate(
                input_ids=ids_NP,
                attention_mask=mask_NP,
                do_sample=False,
                logits_processor=self.sampler,
                max_new_tokens=max(budgets),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                output_logits=self.logprobs_from_sampling,
                return_dict_in_generate=True,
            )
        turn_ids, turn_mask = self._completion(out.sequences[:, width:])
        rows = torch.arange(n, device=self.device)  # every context is its own prompt row
        logprobs = self._behaviour(out, ids_NP, mask_NP, rows, turn_ids, turn_mask, share=False)
        turns = []
        for i, budget in enumerate(budgets):
            kept = min(int(turn_mask[i].sum()), budget)
            turns.append(SampledTurn(turn_ids[i, :kept].tolist(), logprobs[i, :kept].tolist()))
        return turns

    @torch.no_grad()
    def reference_logprobs(
        self,
        prompt_ids_BP: torch.Tensor,
        prompt_mask_BP: torch.Tensor,
        group_ids_N: torch.Tensor,
        episode_ids_NT: torch.Tensor,
        attention_NT: torch.Tensor,
        trained_NT: torch.Tensor,
    ) -> torch.Tensor:
        """[N, T] float32: the reference policy's logprobs of the episode tokens, 0 off
        ``trained_NT``; the forward attends to ``attention_NT`` (context included)."""
        args = (prompt_ids_BP, prompt_mask_BP, group_ids_N, episode_ids_NT, attention_NT)
        to = self.device
        args = tuple(a.to(to) for a in args)  # type: ignore[assignment]
        share = self.shared_prefill
        if self.ref_model is not None:
            ref_NT = group_logprobs(self.ref_model, *args, self.temperature, share_prompts=share)
        else:  # PEFT: the policy acting as its start, no second copy (model/peft.py)
            with reference_mode(self.model):
                ref_NT = group_logprobs(self.model, *args, self.temperature, share_prompts=share)
        return (ref_NT * trained_NT.to(to)).float()

    def _behaviour(
        self,
        out: Any,
        prompt_ids_BP: torch.Tensor,
        prompt_mask_BP: torch.Tensor,
        group_ids_N: torch.Tensor,
        completion_ids_NT: torch.Tensor,
        completion_mask_NT: torch.Tensor,
        share: bool,
    ) -> torch.Tensor:
        """[N, T] float32 behaviour logprobs of ``generate``'s output ``out``, 0 off the mask:
        from its own logits in fp32, else by the learner's function (module docstring)."""
        if self.logprobs_from_sampling:
            # one [N, V] step at a time: no [N, T, V] copy beside the T steps generate holds
            steps = [
                token_logprobs(step_NV[:, None], completion_ids_NT[:, t, None], self.temperature)
                for t, step_NV in enumerate(out.logits)
            ]
            logprobs_NT = torch.cat(steps, dim=1)
        else:
            args = (prompt_ids_BP, prompt_mask_BP, group_ids_N, completion_ids_NT)
            logprobs_NT = group_logprobs(
                self.model, *args, completion_mask_NT, self.temperature, share_prompts=share
            )
        return (logprobs_NT * completion_mask_NT).float()

    def _prefill(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, n: int) -> DynamicCache | None:
        """The KV cache of every prompt but its last token, computed once per prompt and
        repeated ``n`` times (rows i*n.. are prompt i's, as ``group_ids``); ``generate`` then
        runs the last token and samples. None where ``generate`` must prefill itself."""
        if not self.shared_prefill or ids_BP.shape[1] < 2:
            return None
        from transformers import DynamicCache

        ids_BP, mask_BP = ids_BP.to(self.device), mask_BP.to(self.device)
        cache = DynamicCache(config=self.model.config)
        # positions as generate and completion_logprobs count them under left padding
        positions_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if self.logits_to_keep else {}  # not [B, P, V] logits
        self.model(
            input_ids=ids_BP[:, :-1],
            attention_mask=mask_BP[:, :-1],
            position_ids=positions_BP[:, :-1],
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        cache.batch_repeat_interleave(n)
        return cache

    def _completion(self, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask everything after the first EOS. [N, T] each, T the longest completion.

        ``generate`` stops once every row has ended, so its width is already the longest kept
        completion: padding to ``max_new_tokens`` would only add masked columns that every later
        forward (scoring, reference, the learner's) pays for.
        """
        is_eos = generated == self.tokenizer.eos_token_id
        # A token is kept if no EOS came strictly before it: the EOS itself is trained on.
        eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        mask = ~eos_before
        return generated.masked_fill(~mask, self.tokenizer.pad_token_id), mask.long()
