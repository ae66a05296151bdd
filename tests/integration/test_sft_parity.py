"""Parity of dist_ft's SFT step with TRL 1.16's SFTTrainer (the correctness oracle), loss and
parameter gradients, on the tiny model: a real SFTTrainer tokenizes and collates the rows and
runs its own ``compute_loss``; a real Learner (DeepSpeed, full fine-tuning) runs its ``sft``
objective.

Normalisers. TRL's loss is the summed NLL of the label tokens over ``num_items_in_batch``: the
label-token count of the whole accumulation step across ranks when ``Trainer`` passes it, else
this batch's count. dist_ft divides by the step's trained-token count summed over the learner
group (``Learner.step``). Both are a token mean over the step's completion tokens, the same by
design; the test checks it for one batch and for the batch split in two micro-batches, each
divided by the whole step's count.
"""

from dataclasses import replace

import pytest
import torch
from support import build

from dist_ft.data import prepare_sft
from dist_ft.learner import Learner
from dist_ft.model.loading import load_tokenizer
from dist_ft.recipes.sft_dpo import make_batch
from dist_ft.wire.batch import Span

# Unequal completion lengths (token mean != row mean); the tiny tokenizer is per character, so
# TRL's tokenizing of prompt + completion splits where dist_ft's separate encodings do.
ROWS = [
    {"prompt": "Repeat c:", "completion": "cccc"},
    {"prompt": "Say something longer, please:", "completion": " something longer"},
    {"prompt": "x", "completion": "y"},
    {"prompt": "Repeat d:", "completion": "dd"},
    {"prompt": "2+3=", "completion": "5, of course"},
]


@pytest.fixture(scope="module")
def trl_trainer(tiny_path, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to="none",
        use_cpu=True,
        bf16=False,  # the learner's model.dtype=float32
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_path),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=load_tokenizer(tiny_path),
    )
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def examples(tiny_path):
    tok = load_tokenizer(tiny_path)
    prepared = prepare_sft(ROWS, tok, source="rows", template="plain", plain_template="{prompt}")
    return prepared.examples, tok.pad_token_id


def trl_loss_and_grads(trainer, rows, num_items_in_batch=None):
    """TRL's loss on its own collated batch of ``rows`` (dataset indices), and the gradient of
    every parameter by name."""
    model = trainer.model
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss.detach(), {n: g for (n, _), g in zip(named, grads)}


def learner_loss_and_grads(learner, batch, normaliser):
    """The Learner's SFT loss on ``batch`` (its packed or padded forward through the DeepSpeed
    engine), and every parameter's gradient by name. DeepSpeed owns backward; at ZeRO-0 with
    one micro-batch its gradients are the loss's own, cleared after."""
    learner.engine.train()
    loss, _ = learner.micro_loss(batch, "sft", normaliser)
    learner.engine.backward(loss)
    named = learner.module.named_parameters()
    grads = {n: p.grad.detach().clone() for n, p in named if p.requires_grad}
    learner.engine.zero_grad()
    return loss.detach(), grads


def assert_same(ours, theirs):
    (loss, grads), (trl_loss, trl_grads) = ours, theirs
    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == trl_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in grads.values())  # full fine-tuning: every one moves


def test_trl_trains_the_tokens_dist_ft_trains(trl_trainer, examples):
    """Same rows in, same sequences and completion-only mask out: TRL's labels are the ids of
    the completion + EOS, dist_ft's TRAINED spans the same tokens."""
    examples, _ = examples
    for row, e in zip(trl_trainer.train_dataset, examples):
        assert row["input_ids"] == e.ids.tolist()
        trained = [label != -100 for label in row["labels"]]
        assert trained == (e.spans == Span.TRAINED).tolist()


@pytest.mark.parametrize("pack", [True, False])
def test_sft_step_matches_trl_sft_trainer(tiny_path, trl_trainer, examples, pack):
    examples, pad_id = examples
    batch = make_batch([[e] for e in examples], pad_id)
    step_tokens = float(batch.loss_mask.sum())
    _, _, lk = build(tiny_path, "algo.prompts_per_step=4", "peft.method=none")
    learner = Learner(replace(lk, pack=pack))
    every = list(range(len(ROWS)))

    # one batch: TRL divides by its label-token count, dist_ft by the step's trained tokens
    trl_whole = trl_loss_and_grads(trl_trainer, every)
    assert_same(learner_loss_and_grads(learner, batch, step_tokens), trl_whole)

    # two micro-batches of one step: each divided by the whole step's token count
    for half in (every[:2], every[2:]):
        theirs = trl_loss_and_grads(trl_trainer, half, num_items_in_batch=step_tokens)
        assert_same(learner_loss_and_grads(learner, batch.select(half), step_tokens), theirs)

    # and the loss Learner.step reports (and trains on) is TRL's
    reported = learner.step(batch, "sft")["loss"]
    assert reported == pytest.approx(float(trl_whole[0]), rel=1e-6)
