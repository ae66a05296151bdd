"""Parity of dist_ft's DPO, IPO and SimPO losses with TRL 1.16's own loss code (the
correctness oracle), loss and gradient: real DPOTrainer / CPOTrainer code on the tiny model."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from dist_ft.algos.common import token_logprobs
from dist_ft.algos.dpo import dpo_loss, sequence_logps
from dist_ft.algos.settings import DPOLoss, DPOParams

# ------------------------------------------------------------------ parity with TRL 1.16
#
# DPO and IPO: TRL's loss lives in DPOTrainer._compute_loss, which needs a trainer (it reads
# its accelerator, metrics store and reference settings), so a real DPOTrainer is built on the
# tiny model, once per loss type. Its reference logprobs are "precomputed", so they come from the
# batch and the test chooses them. cDPO: TRL 1.16's "sigmoid" ignores label_smoothing; the cDPO
# formula is its "aot" loss, which first sorts the pairs' policy and reference log-ratio
# differences separately; on pairs where both sorts are the same permutation, that is cDPO.
# SimPO: TRL has it in CPOTrainer.cpo_loss (cpo_alpha = 0 is SimPO), a method that reads only
# config values from self, so it is called unbound on a namespace holding them.

PROMPT = 2  # prompt tokens in every row of the synthetic batch
CHOSEN_LENS, REJECTED_LENS = [2, 5, 3], [4, 1, 6]
WIDTH = PROMPT + 6  # [2P, T] with T = 8


@pytest.fixture(scope="module")
def trl_trainer(tiny_path, tmp_path_factory):
    """``trl_trainer(loss_type, beta, label_smoothing)``: a real DPOTrainer (cached), its policy
    the tiny model and its reference a perturbed copy, so the two differ."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from dist_ft.model.loading import load_tokenizer

    data = Dataset.from_dict(
        {
            "prompt": ["1+1=", "2+3=", "7-4="],
            "chosen": ["2", "5, of course", "3."],
            "rejected": ["3 or 4", "6", "4"],
        }
    )
    trainers = {}

    def make(loss_type: str, beta: float, label_smoothing: float = 0.0):
        key = (loss_type, beta, label_smoothing)
        if key not in trainers:
            ref = AutoModelForCausalLM.from_pretrained(tiny_path)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            args = DPOConfig(
                output_dir=str(tmp_path_factory.mktemp("trl")),
                report_to="none",
                use_cpu=True,
                loss_type=[loss_type],
                beta=beta,
                label_smoothing=label_smoothing,
                precompute_ref_log_probs=True,
            )
            trainers[key] = DPOTrainer(
                model=AutoModelForCausalLM.from_pretrained(tiny_path),
                ref_model=ref,
                args=args,
                train_dataset=data,
                processing_class=load_tokenizer(tiny_path),
            )
        return trainers[key]

    return make


class FixedLogprobs:
    """Stands in for the network behind TRL's fused LM head: ``model(..., fused_lm_head=True)``
    returns per-token logprobs (0 where the label is masked) and per-token metric fields."""

    def __init__(self, logp_NT: torch.Tensor):
        self.logp_NT = logp_NT

    def __call__(self, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.logp_NT.detach())
        return SimpleNamespace(
            log_probs=self.logp_NT, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def synthetic_batch(co_monotone: bool):
    """TRL's batch layout ([chosen rows; rejected rows], right-padded) with chosen reference
    logprobs, and a leaf of per-token policy logprobs [2P, T - 1] (position t predicts t + 1)."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor(CHOSEN_LENS + REJECTED_LENS)
    pos = torch.arange(WIDTH)
    completion_NT = ((pos >= PROMPT) & (pos < PROMPT + lens[:, None])).long()
    logp_NT = (-1.5 + 0.5 * torch.randn(len(lens), WIDTH - 1, generator=g)).requires_grad_()
    sums = (logp_NT.detach() * completion_NT[:, 1:]).sum(-1)
    pc, pr = sums.chunk(2)
    rr = pr + torch.randn(len(CHOSEN_LENS), generator=g)
    if co_monotone:  # reference margin an increasing function of the policy margin
        rc = rr + 0.5 * (pc - pr) - 0.3
    else:
        rc = pc + torch.randn(len(CHOSEN_LENS), generator=g)
    inputs = {
        "input_ids": torch.zeros(len(lens), WIDTH, dtype=torch.long),
        "attention_mask": (pos < PROMPT + lens[:, None]).long(),
        "completion_mask": completion_NT,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    return inputs, logp_NT


@pytest.mark.parametrize(
    "trl_loss,label_smoothing,params",
    [
        ("sigmoid", 0.0, DPOParams(beta=0.5)),
        ("ipo", 0.0, DPOParams(loss=DPOLoss.IPO, beta=0.5)),
        ("aot", 0.1, DPOParams(beta=0.5, label_smoothing=0.1)),
    ],
)
def test_dpo_trainer_parity(trl_trainer, trl_loss, label_smoothing, params):
    trainer = trl_trainer(trl_loss, params.beta, label_smoothing)
    inputs, logp_NT = synthetic_batch(co_monotone=trl_loss == "aot")
    shift_mask_NT = inputs["completion_mask"][:, 1:]

    trl_loss_value = trainer.compute_loss(FixedLogprobs(logp_NT * shift_mask_NT), inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss_value, logp_NT)

    total_N, count_N = sequence_logps(logp_NT, shift_mask_NT)
    (pc, pr), (lc, lr) = total_N.chunk(2), count_N.chunk(2)
    rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    if trl_loss == "aot":  # the precondition under which TRL's sort leaves the pairs intact
        assert torch.equal((pc - pr).argsort(), (rc - rr).argsort())
    loss, metrics = dpo_loss(pc, pr, rc, rr, params, lc, lr)
    (grad,) = torch.autograd.grad(loss, logp_NT)

    torch.testing.assert_close(loss, trl_loss_value)
    torch.testing.assert_close(grad, trl_grad)
    assert grad.abs().sum() > 0
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    for key, value in metrics.items():
        assert float(value) == pytest.approx(logged[key][-1], abs=1e-6), key


def test_dpo_trainer_parity_on_the_model(trl_trainer):
    """The whole path on a real forward: our token logprobs and trained-token sums give TRL's
    reference logprobs (it precomputed them with its fused head), and the same loss and
    parameter gradients as TRL's own forward."""
    trainer = trl_trainer("sigmoid", 0.5)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    ids_NT, mask_NT = batch["input_ids"], batch["completion_mask"][:, 1:]

    def sums(module):
        logits_NTV = module(input_ids=ids_NT, attention_mask=batch["attention_mask"]).logits
        return sequence_logps(token_logprobs(logits_NTV[:, :-1], ids_NT[:, 1:]), mask_NT)

    with torch.no_grad():
        ref_N, _ = sums(trainer.ref_model)
    torch.testing.assert_close(
        ref_N, torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    )

    params = [p for p in model.parameters() if p.requires_grad]
    trl_loss_value = trainer.compute_loss(model, batch)
    trl_grads = torch.autograd.grad(trl_loss_value, params)
    total_N, _ = sums(model)
    (pc, pr), (rc, rr) = total_N.chunk(2), ref_N.chunk(2)
    loss, _ = dpo_loss(pc, pr, rc, rr, DPOParams(beta=0.5))
    grads = torch.autograd.grad(loss, params)

    torch.testing.assert_close(loss, trl_loss_value)
    for ours, theirs in zip(grads, trl_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_parity_with_trl_cpo_loss(label_smoothing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns on any import from trl.experimental
        from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.4
    config = SimpleNamespace(
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        alpha=0.0,  # AlphaPO's reward transform off: plain SimPO
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    g = torch.Generator().manual_seed(0)
    inputs, _ = synthetic_batch(co_monotone=False)
    completion_NT = inputs["completion_mask"]
    logits_NTV = torch.randn(*completion_NT.shape, 11, generator=g).requires_grad_()
    ids_NT = torch.randint(0, 11, completion_NT.shape, generator=g)
    labels_NT = ids_NT.masked_fill(completion_NT == 0, -100)

    # TRL: mean logprob of each completion (SimPO's length normalisation), then its loss
    avg_N = CPOTrainer.get_batch_logps(logits_NTV, labels_NT, average_log_prob=True)
    losses_P, trl_chosen_P, trl_rejected_P = CPOTrainer.cpo_loss(config, *avg_N.chunk(2))
    trl_loss_value = losses_P.mean()  # cpo_alpha = 0: no NLL term
    (trl_grad,) = torch.autograd.grad(trl_loss_value, logits_NTV)

    logp_NT = token_logprobs(logits_NTV[:, :-1], ids_NT[:, 1:])
    total_N, count_N = sequence_logps(logp_NT, completion_NT[:, 1:])
    (pc, pr), (lc, lr) = total_N.chunk(2), count_N.chunk(2)
    params = DPOParams(
        loss=DPOLoss.SIMPO, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing
    )
    loss, metrics = dpo_loss(pc, pr, None, None, params, lc, lr)
    (grad,) = torch.autograd.grad(loss, logits_NTV)

    torch.testing.assert_close(loss, trl_loss_value)
    torch.testing.assert_close(grad, trl_grad)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(trl_chosen_P.mean()))
    assert float(metrics["rewards/rejected"]) == pytest.approx(float(trl_rejected_P.mean()))
