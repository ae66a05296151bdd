"""``dist-ft compare RUN_DIR``: what a run changed, in words and in reward.

The base model and the run's trained policy each answer the run's prompts, greedily and by
sampling at the run's temperature from the same seed (what the rollouts saw); the run's own
reward functions score both, and a few prompts are shown side by side. Written to
``RUN_DIR/compare.md`` and printed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_ft.model.loading import load_policy, load_tokenizer, resolve_model_path
from dist_ft.model.spec import HFModel, PeftMethod, PeftSpec

if TYPE_CHECKING:
    from dist_ft.rollout import RolloutSpec
    from dist_ft.wire.prompt import Prompt


@dataclass
class Answers:
    """One policy's answers to the M prompts."""

    greedy: list[str]  # [M]; empty for an environment's episodes (sampled only)
    sampled: list[str]  # [M * S]: S samples per prompt at the run's temperature, prompt-major
    reward_greedy: list[float]  # [M] weighted total reward of each answer (or empty)
    reward_sampled: list[float]  # [M * S]


@dataclass
class Comparison:
    questions: list[str]  # [M] the rows' prompts as written (before any template)
    answers: list[str | None]  # [M] reference answers
    samples: int  # S
    temperature: float
    before: Answers  # the base model
    after: Answers  # the trained policy

    def table(self, show: int) -> str:
        """Markdown: mean rewards, then ``show`` prompts spread over the set, each with its first
        sampled answer before and after (what the run's rollouts looked like)."""

        def cell(text: str | None) -> str:
            return "" if text is None else text.replace("|", "\\|").replace("\n", " ").strip()

        def mean(x: list[float]) -> str:
            return f"{sum(x) / len(x):.3f}"

        m, s, b, a = len(self.questions), self.samples, self.before, self.after
        greedy = (
            f"; greedy before {mean(b.reward_greedy)}, after {mean(a.reward_greedy)}"
            if b.greedy
            else " (episodes: transcripts below, environment turns as [env: ...])"
        )
        lines = [
            f"Mean reward over {m} prompts: sampled ({s} per prompt, temperature "
            f"{self.temperature:g}) before {mean(b.reward_sampled)}, after "
            f"{mean(a.reward_sampled)}{greedy}",
            "",
            "| prompt | answer | before (sampled) | reward | after (sampled) | reward |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i in sorted({k * m // min(show, m) for k in range(min(show, m))}):
            lines.append(
                f"| {cell(self.questions[i])} | {cell(self.answers[i])} "
                f"| {cell(b.sampled[i * s])} | {b.reward_sampled[i * s]:.2f} "
                f"| {cell(a.sampled[i * s])} | {a.reward_sampled[i * s]:.2f} |"
            )
        return "\n".join(lines) + "\n"


@torch.no_grad()
def complete(
    model: HFModel,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch: int,
    temperature: float | None = None,
    n: int = 1,
) -> list[str]:
    """Completions of ``prompts`` (special tokens removed): greedy, or ``n`` per prompt sampled
    at ``temperature`` from the full distribution (no top-k), prompt-major."""
    out: list[str] = []
    sample = temperature is not None
    for start in range(0, len(prompts), batch):
        enc = tokenizer(
            prompts[start : start + batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(next(model.parameters()).device)
        ids = model.generate(
            **enc,
            do_sample=sample,
            **(
                {"temperature": temperature, "top_k": 0, "num_return_sequences": n}
                if sample
                else {}
            ),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def compare_run(
    run_dir: str | Path, max_prompts: int = 64, samples: int = 4, batch: int = 16, seed: int = 0
) -> Comparison:
    """Score the base and the trained policy of the finished run in ``run_dir`` on the first
    ``max_prompts`` good rows of its data (0 = all): greedy, and ``samples`` per prompt."""
    from dist_ft.config import ConfigError
    from dist_ft.data import load_rows, prompt_row
    from dist_ft.model.weights import load_artefact
    from dist_ft.rewards import RewardSet
    from dist_ft.run.artefacts import finished_run
    from dist_ft.run.samplers import load_prompts
    from dist_ft.run.specs import component_specs, resolve_device

    cfg, weights = finished_run(run_dir)
    run, method = Path(run_dir), cfg.peft.method
    base = resolve_model_path(cfg.model.path, cfg.model.tiny)
    rollout, _ = component_specs(cfg, base)
    if any(name == "judge" for name, _, _ in rollout.rewards):  # before any model loads
        raise ConfigError(
            f"{run}: compare scores with rule and user reward functions; this run's reward "
            "includes the RLAIF judge, which needs its own model (see dist-ft label)",
            keys=("reward.functions",),
        )
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer).prompts
    prompts = prompts[:max_prompts] if max_prompts else prompts
    rows = load_rows(cfg.data.source, cfg.data.demo_size, cfg.run.seed)
    questions = [str(prompt_row(rows, p.index)[cfg.data.prompt_field]) for p in prompts]
    answers = [p.answer for p in prompts]
    if rollout.env is not None:
        before, after = (
            play_episodes(rollout, prompts, tokenizer, samples, seed, weights if trained else None)
            for trained in (False, True)
        )
        return Comparison(questions, answers, samples, cfg.rollout.temperature, before, after)
    texts = [p.text for p in prompts]
    device = torch.device(resolve_device(cfg.resources.device))
    dtype, remote, new = cfg.model.dtype, cfg.model.trust_remote_code, cfg.rollout.max_new_tokens

    no_peft = PeftSpec(method=PeftMethod.NONE)
    outputs = []
    for trained in (False, True):
        if not trained:
            model = load_policy(base, dtype, no_peft, device, remote).eval()
        elif method is PeftMethod.NONE:
            model = load_policy(str(weights), dtype, no_peft, device, remote).eval()
        else:
            model = load_policy(base, dtype, cfg.peft, device, remote).eval()
            load_artefact(model, weights)
        torch.manual_seed(seed)  # both policies sample from the same stream
        outputs.append(
            (
                complete(model, tokenizer, texts, new, batch),
                complete(model, tokenizer, texts, new, batch, cfg.rollout.temperature, samples),
            )
        )

    rewards = RewardSet(rollout.rewards, rollout.reward_timeout_s, tasks=rollout.reward_tasks)
    tasks = [p.task for p in prompts]

    def totals(completions: list[str]) -> list[float]:
        k = len(completions) // len(texts)  # answers per prompt, prompt-major

        def each(xs: list[Any]) -> list[Any]:
            return [x for x in xs for _ in range(k)]

        scores = rewards.score(each(texts), completions, each(answers), each(tasks))
        return scores.total(rewards.weights, fill=0.0).tolist()

    before, after = (Answers(g, s, totals(g), totals(s)) for g, s in outputs)
    return Comparison(questions, answers, samples, cfg.rollout.temperature, before, after)


def play_episodes(
    rollout: RolloutSpec,
    prompts: list[Prompt],
    tokenizer: Any,
    samples: int,
    seed: int,
    weights: Path | None,
) -> Answers:
    """An environment run's policy (the base model when ``weights`` is None) plays ``samples``
    episodes of each prompt through the run's own rollout worker (its environment, tools and
    rewards), sampled at the run's temperature from ``seed``. Each answer is the episode's
    transcript, environment turns marked ``[env: ...]``; its reward the episode's return.
    Episodes are sampled only: an environment's turns are not greedy."""
    from dist_ft.model.weights import load_artefact
    from dist_ft.rollout import RolloutWorker
    from dist_ft.wire.batch import Span

    gen = rollout.generation
    if weights is None:
        gen = replace(gen, peft=PeftSpec(method=PeftMethod.NONE))
    elif gen.peft.method is PeftMethod.NONE:
        gen = replace(gen, model_path=str(weights))  # the run's full model
    worker = RolloutWorker(replace(rollout, generation=gen, group_size=samples, seed=seed))
    try:
        if weights is not None and gen.peft.method is not PeftMethod.NONE:
            load_artefact(worker.generator.model, weights)  # type: ignore[attr-defined]
        torch.manual_seed(seed)  # both policies sample from the same stream
        batch = worker.rollout(0, prompts, seed)
    finally:
        worker.close()  # an engine's own process (vLLM) goes with it
    # prompt-major, each prompt's episodes in their order (episodes finish out of order)
    order = sorted(range(len(batch)), key=lambda i: (int(batch.group_ids[i]), i))
    transcripts = [
        "".join(
            text if span is Span.TRAINED else f" [env: {text.strip()}] "
            for span, ids in batch.turns(i)
            for text in [tokenizer.decode(ids, skip_special_tokens=True)]
        )
        for i in order
    ]
    return Answers([], transcripts, [], [float(batch.reward_total[i]) for i in order])
