"""A run's output as it reads in a file (CI, nohup, sbatch and Ray job logs), issue 20: plain
progress lines, sampled completions, no third-party chatter, no console copy in wandb."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.rewards.rules import char_match

TESTS = Path(__file__).resolve().parents[1]
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
SECRET = "canary-5f1e0c"
PRINTS = "reward_fns:prints_secret"
# Every line dist_ft itself prints in a demo run, and the lines of the test's own reward
OWN = [
    r"run\.overwrite=true: removed the previous run's outputs from ",
    r"wandb: offline run \S+/wandb/offline-run-\S+ \(`wandb sync` uploads it\)$",
    r"demo: steps 1-20 of 20; a progress line every 2 steps or 30 s",
    r"step \d+/20 \(\d+%\)  reward/mean \S+  loss \S+  kl \S+  samples_per_s \S+  \[.*\]$",
    r"sample, step \d+: .+ -> .+ \(answer .+; reward \S+: char_match \S+, "
    rf"{PRINTS} \S+\)$",
    r"mean reward: first 10 steps \S+, last 10 steps \S+ \(rise \S+\)$",
    r"metrics: \S+  plot: \S+  weights: \S+$",
    rf"reward_fns: token={SECRET}$",
]


def test_a_demo_run_into_a_file_prints_progress_and_samples_and_no_library_noise(tmp_path):
    out, log = tmp_path / "run", tmp_path / "out.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "WANDB_MODE": "offline",
        "DIST_FT_TEST_SECRET": SECRET,
    }
    env.pop("WANDB_CONSOLE", None)
    with log.open("w") as f:
        rc = subprocess.run(
            [DIST_FT, "demo", "run.steps=20", f"run.output_dir={out}",
             "grpo.sft_warmup_steps=0", "algo.prompts_per_step=2", "rollout.group_size=4",
             f"reward.functions=[{{name: char_match}}, {{name: '{PRINTS}', weight: 0}}]"],
            stdout=f, stderr=subprocess.STDOUT, env=env, timeout=480,
        ).returncode  # fmt: skip
    lines = log.read_text().splitlines()
    assert rc == 0, lines[-30:]
    noise = [line for line in lines if not any(re.match(p, line) for p in OWN)]
    assert noise == [], "\n".join(noise)

    due = [1, 2, *range(4, 21, 2)]  # the first two steps, then every tenth of the run
    progress = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+)/", line).group(1)) for line in progress] == due
    assert all(line.endswith(" left]") for line in progress[1:])
    assert len([line for line in lines if line.startswith("sample, step ")]) == len(due)

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # run.log_samples=8 a due step: both groups of 4 completions
    assert [r["step"] for r in rows] == [s for s in due for _ in range(8)]
    for r in rows:
        (turn,) = r["turns"]
        assert turn["role"] == "policy"
        assert r["answer"] == r["prompt"][-2] * 4  # "Repeat c:" -> "cccc"
        # the text decoded for the log is the text that the reward scored
        score = char_match([r["prompt"]], [turn["text"]], [r["answer"]])[0]
        # rewards travel as float32 (char_match's 1/7 is not exact there)
        want = {"char_match": score, "reward_fns:prints_secret": 0.0}
        assert r["rewards"] == pytest.approx(want, abs=1e-6)
        assert r["reward"] == pytest.approx(score, abs=1e-6)
    assert sum(r["reward"] for r in rows) > 0  # some completion got credit

    # what the reward printed is the user's to see, and kept nowhere in the run's files
    assert any(SECRET in line for line in lines)
    assert not list(out.rglob("output.log"))
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_ray_actors_keep_the_libraries_chatter_out_too(tmp_path):
    """On a private Ray the actors' output reaches the driver's log: each actor process drops
    the same routine library lines as the driver (Ray's worker_process_setup_hook), so a run
    prints no actor line at all (without the hook: 11 here, DeepSpeed's accelerator line,
    bitsandbytes' kernel hint, peft's FutureWarning from every actor)."""
    log = tmp_path / "out.txt"
    with log.open("w") as f:
        rc = subprocess.run(
            [DIST_FT, "demo", "run.steps=2", f"run.output_dir={tmp_path / 'run'}",
             "grpo.sft_warmup_steps=0", "resources.mode=ray", "resources.ray_address=local",
             "resources.rollout_workers=2", "run.wandb=disabled"],
            stdout=f, stderr=subprocess.STDOUT, timeout=480,
        ).returncode  # fmt: skip
    lines = log.read_text().splitlines()
    assert rc == 0, lines[-30:]
    assert any(line.startswith("step 2/2") for line in lines)
    actors = [line for line in lines if re.search(r"\((RolloutWorker|LearnerHost) pid=", line)]
    assert actors == [], "\n".join(actors)
