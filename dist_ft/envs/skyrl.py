"""skyrl-gym's text environments, unchanged, as dist_ft environments (``dist_ft[envs]``).

``env.name: skyrl_gym`` builds the environment a row names in its ``env_class`` column (or
``env.kwargs.env_class``) with ``skyrl_gym.make(env_class, env_config=..., extras=row)``: the
row is in SkyRL's own dataset layout (``prompt`` as chat messages, ``reward_spec`` with its
``ground_truth``, ``extra_info``), so a SkyRL parquet file is read as it is with
``data.source: file.parquet`` and ``data.template: chat``. ``init`` gives the first messages,
each ``step`` output becomes a :class:`Step` (its observations, reward and done; numeric
metadata summed into metrics); the environment's ``get_metrics()`` is added at the end.
"""

from __future__ import annotations

from typing import Any

from dist_ft.envs.base import Message, Step


class SkyRLGym:
    def __init__(
        self,
        row: dict[str, Any],
        env_class: str | None = None,
        env_config: dict[str, Any] | None = None,
    ) -> None:
        try:
            import skyrl_gym
        except ImportError:
            raise ImportError(
                "env.name skyrl_gym: install skyrl-gym (pip install 'dist_ft[envs]')"
            ) from None
        name = row.get("env_class") or env_class
        if not name:
            raise ValueError("skyrl_gym: the row has no env_class column and env.kwargs none")
        self.prompt: list[Message] = list(row["prompt"])
        self.env = skyrl_gym.make(name, env_config=env_config or {}, extras=row)

    def reset(self) -> list[Message]:
        messages, _ = self.env.init(self.prompt)
        return list(messages)

    def step(self, message: str) -> Step:
        out = self.env.step(message)
        info = {k: float(v) for k, v in (out.get("metadata") or {}).items() if _number(v)}
        if out["done"]:
            info.update({k: float(v) for k, v in self.env.get_metrics().items() if _number(v)})
        return Step(list(out["observations"]), float(out["reward"]), bool(out["done"]), info)

    def close(self) -> None:
        self.env.close()


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
