"""The built-in environments' tools and rewards, with the real sandbox (bubblewrap)."""

from __future__ import annotations

import os

import pytest

from dist_ft.envs.code_editor import TASKS, CodeEditor
from dist_ft.envs.code_editor import rows as editor_rows
from dist_ft.envs.python import Python
from dist_ft.envs.python import rows as python_rows


def test_python_runs_a_snippet_and_rewards_the_answer():
    env = Python({"prompt": "What is the sum of the squares of 1 to 10?", "answer": "385"})
    assert env.run("print(sum(i * i for i in range(1, 11)))") == "385\n"
    end = env.step("It is 385.")
    assert (end.reward, end.done, end.info) == (1.0, True, {"correct": 1.0, "code_errors": 0.0})


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "OSError"),
        ("open('/etc/dist_ft_probe', 'w').write('x')", "Error"),
        ("while True: pass", "timeout"),
    ],
    ids=["network", "write-outside", "hang"],
)
def test_python_snippets_cannot_reach_out_and_are_counted(code, says):
    env = Python({"prompt": "q", "answer": "1"}, timeout_s=2)
    out = env.run(code)
    assert out.startswith("error: ") and says in out
    assert env.step("1").info["code_errors"] == 1.0
    assert not os.path.exists("/etc/dist_ft_probe")


def test_python_rows_have_true_answers():
    for row in python_rows(9, seed=2):
        if "squares" in row["prompt"]:
            m = int(row["prompt"].split()[-1].rstrip("?"))
            assert int(row["answer"]) == m * (m + 1) * (2 * m + 1) // 6


@pytest.fixture
def editor():
    env = CodeEditor(next(r for r in editor_rows(len(TASKS)) if "stats.py" in r["files"]))
    yield env
    env.close()
    assert not env.root.exists()


def test_code_editor_fix_raises_the_share_of_passing_tests(editor):
    assert editor.run_tests().startswith("0/2 tests pass; first failure: test 0")
    assert editor.step("done").reward == 0.0
    assert editor.view("stats.py").startswith("  1 def mean(xs):")
    assert editor.replace("stats.py", "(len(xs) - 1)", "len(xs)") == "replaced in stats.py"
    assert editor.run_tests() == "2/2 tests pass"
    end = editor.step("done")
    assert (end.reward, end.done, end.info["tests_passed"]) == (1.0, True, 1.0)


def test_code_editor_refuses_paths_outside_its_workspace(editor, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (editor.root / "link.py").symlink_to(outside)
    for path in ["../secret.txt", str(outside), "link.py", "."]:
        assert "outside the workspace" in editor.view(path)
    assert "outside the workspace" in editor.replace("../../etc/passwd", "root", "x")
    assert outside.read_text() == "secret"
    assert editor.step("done").info["refused_paths"] == 5.0


def test_code_editor_replace_needs_exactly_one_match(editor):
    assert "occurs 0 times" in editor.replace("stats.py", "nothing like it", "x")
    assert "occurs 3 times" in editor.replace("stats.py", "xs", "ys")
    assert "No such file" in editor.view("missing.py")


def test_every_code_editor_task_is_broken():
    assert all(len(asserts) >= 2 for *_, asserts in TASKS)
    for row in editor_rows(len(TASKS)):
        env = CodeEditor(row)
        try:
            assert env.step("done").reward < 1.0, row["prompt"]  # the bug fails a test
        finally:
            env.close()
