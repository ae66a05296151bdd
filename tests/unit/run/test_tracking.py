"""What a run shows (issue 20, "logs people can read"): plain progress lines when stdout is a
file, sampled completions as rows that fit multi-turn episodes, and a plot that says what it
draws."""

import json

import pytest
import torch

from dist_ft.model.loading import load_tokenizer
from dist_ft.run.tracking import Tracker, sample_rows
from dist_ft.wire.batch import ScoredBatch, Span
from dist_ft.wire.prompt import Prompt


def tracker(out, total: int, **kw) -> Tracker:
    return Tracker(
        out, run_name="t", total_steps=total, wandb_mode="disabled", wandb_project="p",
        config={}, plot=False, **kw,
    )  # fmt: skip


def test_off_a_terminal_progress_is_plain_lines_every_tenth_of_the_run(tmp_path, capsys):
    t = tracker(tmp_path, 20)  # pytest captures stdout: not a terminal
    for step in range(1, 21):
        t.log(step, {"reward/mean": step / 20, "loss": 0.5, "kl": 0.0, "samples_per_s": 9.0})
    t.finish()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "t: steps 1-20 of 20; a progress line every 2 steps or 30 s, with the time left from step 2"
    )
    progress = [line for line in lines if line.startswith("step ")]
    # the first step, the second (the first with a time per step), then every 2nd
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [1, 2, *range(4, 21, 2)]
    assert progress[2].startswith("step 4/20 (20%)  reward/mean 0.2  loss 0.5  kl 0  ")
    assert "samples_per_s 9" in progress[2] and progress[2].endswith(" left]")
    assert progress[0].endswith(" to the first step]")
    assert len(lines) == 1 + len(progress)  # the bar's own rendering never reaches the file


def test_a_resumed_run_says_which_steps_are_left(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    )
    t = tracker(tmp_path, 100, resume_step=2)
    t.log(3, {"loss": 0.9})
    t.finish()
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("t: steps 3-100 of 100; a progress line every 10 steps")
    assert second.startswith("step 3/100 (3%)")


def test_episode_turns_split_at_span_changes():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 0, 0, 0, 0, 0]], dtype=torch.int32)
    T, C, P = Span.TRAINED, Span.CONTEXT, Span.PAD
    mask = torch.tensor([[T, T, C, C, T, P], [T, P, P, P, P, P]], dtype=torch.int8)
    batch = ScoredBatch.supervised(torch.ones(2, 1), torch.ones(2, 1), ids, mask != P)
    batch.episode_mask = mask
    assert batch.turns(0) == [(T, [5, 6]), (C, [7, 8]), (T, [9])]
    assert batch.turns(1) == [(T, [5])]


def test_sample_rows_decode_the_first_group_with_each_reward(tiny_path):
    tok = load_tokenizer(tiny_path)
    prompts = [Prompt(3, "Repeat c:", "cccc"), Prompt(7, "Repeat d:", "dddd")]
    texts = ["dddd", "cccc", "cc", "ccx"]  # samples 0 and 1: prompt 7; 2 and 3: prompt 3
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    batch = ScoredBatch.supervised(
        torch.ones(4, 1), torch.ones(4, 1), enc.input_ids, enc.attention_mask
    )
    batch.group_ids = torch.tensor([1, 1, 0, 0], dtype=torch.int32)
    batch.sample_ids = torch.tensor([[5, 7, 0], [5, 7, 1], [5, 3, 0], [5, 3, 1]])
    batch.reward_names = ["char_match", "judge"]
    batch.rewards = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.5, 0.0], [0.75, 0.0]])
    batch.reward_errors = torch.tensor(
        [[False, False], [False, False], [False, True], [False, False]]
    )
    batch.reward_total = batch.rewards.sum(1)
    batch.advantages = torch.tensor([1.0, -1.0, -0.5, 0.5])
    rows = sample_rows(batch, tok, prompts, 3)
    # group 0 (prompt row 3) first, in sample order, then group 1's first
    assert [r["sample_id"] for r in rows] == [[5, 3, 0], [5, 3, 1], [5, 7, 0]]
    assert rows[0] == {
        "sample_id": [5, 3, 0],
        "version": 0,
        "task": "default",
        "prompt": "Repeat c:",
        "turns": [{"role": "policy", "text": "cc"}],
        "answer": "cccc",
        "reward": 0.5,
        "rewards": {"char_match": 0.5, "judge": None},  # judge failed on it
        "advantage": -0.5,
        "trained": True,
    }
    assert rows[1]["turns"] == [{"role": "policy", "text": "ccx"}]
    assert rows[2]["rewards"] == {"char_match": 1.0, "judge": 0.5}


@pytest.mark.parametrize("steps", [5, 60])
def test_plot_draws_reward_and_kl_with_a_title_and_distinct_legend_lines(tmp_path, steps):
    t = tracker(tmp_path, steps)
    for step in range(1, steps + 1):
        t.log(step, {"reward/mean": step / steps, "kl": 0.0})
    fig = t.figure()
    reward, kl = fig.axes
    assert (reward.get_ylabel(), kl.get_ylabel()) == ("reward/mean", "kl")
    assert fig._suptitle.get_text() == "t: reward/mean, kl by step"
    labels = [line.get_label() for line in reward.get_lines()]
    assert labels == (["per step"] if steps < 60 else ["per step", "mean of 2"])
    assert (reward.get_legend() is None) == (steps < 60)
    # KL with its term off is drawn, and says why it is flat
    assert [x.get_text() for x in kl.texts] == ["0 at every step: no KL term (grpo.beta=0)"]


def test_accuracy_axes_span_0_to_1(tmp_path):
    t = tracker(tmp_path, 4, shown=("loss", "accuracy"), plotted=("loss", "accuracy"))
    for step, acc in enumerate([0.84, 0.9, 0.95, 1.0], start=1):
        t.log(step, {"loss": 1 / step, "accuracy": acc})
    loss, accuracy = t.figure().axes
    assert accuracy.get_ylim() == (0.0, 1.0)
    assert loss.get_ylim()[0] > 0.2  # other metrics keep their auto-scaled axis
