"""The README's example environment, as printed there."""

from __future__ import annotations

from support import readme_example


def test_the_readme_environment_plays_as_described():
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    env = namespace["Guess"]({"prompt": "guess", "answer": "7"})
    assert env.reset()[0]["role"] == "user"
    low = env.step("Is it 3?")
    assert (low.messages, low.reward, low.done) == (
        [{"role": "user", "content": "higher"}],
        -0.1,
        False,
    )
    assert env.step("12").messages[0]["content"] == "lower"
    end = env.step("7")
    assert (end.reward, end.done, end.info) == (1.0, True, {"solved": 1})
