"""reasoning-gym's procedural tasks as environments (``pip install dist_ft[envs]``).

``data.source: reasoning_gym/<task>`` draws ``data.demo_size`` problems from the task's own
generator (``reasoning_gym.create_dataset(task, size, seed)``, offline) and ``env.name:
reasoning_gym`` scores a reply with the task's own verifier (``get_score_answer_fn``) on the
text inside ``<answer>...</answer>`` (reasoning-gym's convention and system prompt; the whole
reply without the tags). With ``env.kwargs.retries: k`` a wrong reply is told so and may try
again, up to k times (within ``env.max_turns``): each turn's score is its reward, so a first
try that is right earns more than a later one (``first_try_bonus``).
"""

from __future__ import annotations

from typing import Any

from dist_ft.envs.base import Message, Step


class ReasoningGym:
    def __init__(self, row: dict[str, Any], retries: int = 0, first_try_bonus: float = 0.0):
        import reasoning_gym
        from reasoning_gym.utils import SYSTEM_PROMPTS

        self.entry = row["entry"]
        self.score = reasoning_gym.get_score_answer_fn(self.entry["metadata"]["source_dataset"])
        self.system = SYSTEM_PROMPTS["default"]
        self.retries, self.bonus, self.tries = retries, first_try_bonus, 0

    def reset(self) -> list[Message]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.entry["question"]},
        ]

    def step(self, message: str) -> Step:
        from reasoning_gym.utils import extract_answer

        self.tries += 1
        answer = extract_answer(message) or message.strip()
        score = float(self.score(answer, self.entry))
        reward = score + (self.bonus if self.tries == 1 and score == 1.0 else 0.0)
        info = {"solved": float(score == 1.0), "tries": 1.0}
        if score == 1.0 or self.tries > self.retries:
            return Step(reward=reward, done=True, info=info)
        retry = [{"role": "user", "content": "That is not right. Try again."}]
        return Step(retry, reward=reward, info=info)


def rows(n: int, seed: int = 0, task: str = "leg_counting") -> list[dict[str, Any]]:
    """``n`` problems of reasoning-gym's ``task``: ``{"prompt", "answer", "entry"}``."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError(
            "data.source reasoning_gym/...: install reasoning-gym (pip install 'dist_ft[envs]')"
        ) from None
    dataset = reasoning_gym.create_dataset(task, size=n, seed=seed)
    return [{"prompt": e["question"], "answer": str(e["answer"]), "entry": e} for e in dataset]
