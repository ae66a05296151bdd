"""``HFGenerator``: transformers ``generate`` on the local policy, then one scoring forward.

The scoring forward recomputes the sampled tokens' logprobs with the same function the learner
uses (:func:`dist_ft.models.completion_logprobs`), so behaviour and learner logprobs agree to
float tolerance at ratio 1.
"""

from __future__ import annotations

import torch

from dist_ft.batch import Span
from dist_ft.models import (
    DTYPES,
    PeftMethod,
    PeftSpec,
    completion_logprobs,
    export_state,
    import_state,
    is_adapter,
    load_policy,
    load_tokenizer,
)
from dist_ft.peft_methods import reference_mode
from dist_ft.rollout.base import Generation, GeneratorSpec


class HFGenerator:
    def __init__(self, spec: GeneratorSpec) -> None:
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
            self.ref_model = load_policy(spec.model_path, spec.dtype, no_peft, self.device).eval()
        self.need_ref = spec.need_ref_logprobs
        self.max_new_tokens = spec.max_new_tokens
        self.temperature = spec.temperature
        self.top_p = spec.top_p

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

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int) -> Generation:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        group_ids = torch.arange(len(prompts)).repeat_interleave(n)  # [B*G]: rows i*n.. are i's
        # generate needs every sample's prompt; only the [B, P] table leaves this function.
        prompt_ids = enc["input_ids"][group_ids].to(self.device)  # [B*G, P]
        prompt_mask = enc["attention_mask"][group_ids].to(self.device)  # [B*G, P]
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,  # no top-k truncation: behaviour logprobs must be the sampling distribution
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        completion_ids, completion_mask = self._completion(out[:, prompt_ids.shape[1] :])
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask, self.temperature)
        logprobs = completion_logprobs(self.model, *args) * completion_mask  # [B*G, T]
        ref_logprobs = None
        if self.need_ref:
            if self.ref_model is not None:
                ref_logprobs = completion_logprobs(self.ref_model, *args)
            else:  # PEFT: the policy acting as its start, no second copy (peft_methods)
                with reference_mode(self.model):
                    ref_logprobs = completion_logprobs(self.model, *args)
            ref_logprobs = (ref_logprobs * completion_mask).float()
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

    def _completion(self, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to ``max_new_tokens`` and mask everything after the first EOS. [N, T] each."""
        n, t = generated.shape
        pad = self.tokenizer.pad_token_id
        if t < self.max_new_tokens:
            fill = torch.full((n, self.max_new_tokens - t), pad, dtype=generated.dtype)
            generated = torch.cat([generated, fill.to(generated.device)], dim=1)
        is_eos = generated == self.tokenizer.eos_token_id
        # A token is kept if no EOS came strictly before it: the EOS itself is trained on.
        eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        mask = ~eos_before
        return generated.masked_fill(~mask, pad), mask.long()
