"""The SLURM scripts against a live one-node Slurm (tests/slurm/start_slurm.sh).

Run with ``python -m pytest tests/test_slurm_live.py -m slurm`` (deselected by default). The fixture
``live_slurm`` comes from tests/slurm/fixtures.py (registered in tests/conftest.py).

- Slurm itself: a job runs; a failing job shows its error in its output file and a FAILED state.
- The scripts: ``bash -n``, one shared requeue block, ``sbatch --test-only`` against the controller.
- Plumbing, with a stand-in ``slidemil`` (``python -m slidemil`` resolves to it through PYTHONPATH):
  the command lines the array scripts build, shard coverage, the CV summary after the last fold;
  arrays whose ids start anywhere or have a step (--array=1-4, 5-11:2) run shards 0..N-1 once each,
  a list that is not a range (1,3,5,7) is refused by every task, NUM_SHARDS reruns chosen shards.
  (The index arithmetic itself, without Slurm: tests/test_slurm_scripts.py.)
- The real commands, scripts unchanged: train.sbatch with 2 CPU ranks (srun + torchrun, c10d
  rendezvous, gloo) matches a direct torchrun run; a requeued training run resumes from its last
  checkpoint and ends like an uninterrupted one; cv_array as --array=3-5 writes every fold and the
  summary; extract_array (--array=0-1) and score_array (--array=1-4) shards together cover every slide once.
- Requeue mechanics: the scripts' signal-trap block (copied verbatim from train.sbatch) around a
  stand-in trainer, stopped by ``scontrol requeue`` (TERM, as a preemption) and by USR1 (what
  ``--signal=B:USR1@120`` sends before the time limit): each rerun continues from the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm.fixtures import (
    REPO,
    job_info,
    jobcomp_records,
    sbatch,
    wait_finished,
    wait_for,
)
from tests.trainer_fixtures import assert_same_metrics

pytestmark = pytest.mark.slurm

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
EXPECTED_SCRIPTS = {"train.sbatch", "cv_array.sbatch", "score_array.sbatch", "extract_array.sbatch"}
BLOCK_START = "# >>> requeue-safe runner"
BLOCK_END = "# <<< requeue-safe runner <<<\n"


def _sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
    return r.stdout


def _requeue_block(script: Path) -> str:
    text = script.read_text()
    start, end = text.index(BLOCK_START), text.index(BLOCK_END) + len(BLOCK_END)
    return text[start:end]


# ---- Slurm itself ------------------------------------------------------------------------------------


def test_node_idle_and_trivial_job_runs(live_slurm, tmp_path):
    sinfo = _sh("sinfo", "-N", "-o", "%N %P %T %c %m")
    print(sinfo)
    node_line = next(ln for ln in sinfo.splitlines() if ln.startswith(live_slurm.node + " "))
    busy = _sh("squeue", "-h", "-w", live_slurm.node).strip()
    assert "idle" in node_line or busy, node_line

    out = tmp_path / "hostname-%j.out"
    rc, job_id, _ = sbatch([f"--output={out}", "--job-name=slidemil-hostname", "--wrap", "hostname -s"],
                           wait=True, cwd=tmp_path, timeout=120)
    assert rc == 0
    text = (tmp_path / f"hostname-{job_id}.out").read_text()
    assert text.strip() == socket.gethostname().split(".")[0] or text.strip() == live_slurm.node
    info = job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    print(_sh("squeue", "-o", "%.8i %.9P %.20j %.8T %.10M %R"))


def test_failing_job_shows_its_error_and_exit_state(live_slurm, tmp_path):
    out = tmp_path / "fail-%j.out"
    message = "slidemil-test: metadata.csv row 3: label 7 is out of range (2 classes)"
    rc, job_id, _ = sbatch(
        [f"--output={out}", "--job-name=slidemil-fail", "--wrap", f"echo '{message}' >&2; exit 3"],
        wait=True, cwd=tmp_path, timeout=120)
    assert rc == 3  # sbatch --wait exits with the job's exit code
    assert message in (tmp_path / f"fail-{job_id}.out").read_text()
    info = job_info(job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
    records = jobcomp_records(job_id)  # accounting is off: jobcomp/filetxt is our sacct
    if records:
        print(records[-1])
        assert "JobState=FAILED" in records[-1] and "ExitCode=3:0" in records[-1]


# ---- the scripts, statically and against the controller ---------------------------------------------


def test_sbatch_scripts_parse_and_pass_test_only(live_slurm):
    assert EXPECTED_SCRIPTS <= {s.name for s in SCRIPTS}
    block = _requeue_block(REPO / "slurm" / "train.sbatch")
    for script in SCRIPTS:
        text = script.read_text()
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
        assert "#SBATCH --requeue" in text and re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)
        assert _requeue_block(script) == block, f"{script.name}: requeue block differs from train.sbatch"
        # every setting at the top is overridable from the environment
        settings = re.findall(r"^([A-Z_]+)=\$\{\1:?-", text, re.M)
        assert {"OUT", "VENV", "PYTHON"} <= set(settings), (script.name, settings)
        r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True,
                           timeout=30, cwd=REPO)
        assert r.returncode == 0 and "to start at" in r.stderr, f"{script.name}: {r.stderr}"
        # outside Slurm the scripts refuse with a reason instead of running something half-configured
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                           env={"PATH": "/usr/bin:/bin", "OUT": "/nonexistent"})
        assert r.returncode != 0 and "submit this script with sbatch" in r.stderr, (script.name, r.stderr)
    for name in ("train.sbatch", "cv_array.sbatch"):
        assert "--resume" in (REPO / "slurm" / name).read_text()


# ---- the scripts, run unchanged with a stand-in slidemil -------------------------------------------

FAKE_MAIN = r'''
"""Stand-in for `python -m slidemil` in the SLURM script tests: records how it was called."""
import json, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
rec = {"argv": argv, "env": {k: os.environ.get(k) for k in (
    "OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")}}
if argv and argv[0] == "cv-summary":
    out = Path(argv[argv.index("--out") + 1])
    rec["folds_done"] = sorted(p.parent.name for p in out.glob("fold_*/.slurm_fold_done"))
    (out / "cv_summary.csv").write_text("metric,mean,std\n")
if os.environ.get("FAKE_FAIL") and argv and argv[0] == os.environ["FAKE_FAIL"]:
    print(f"slidemil: error: stand-in failure of {argv[0]}", file=sys.stderr)
    sys.exit(2)
log = Path(os.environ["FAKE_LOG"])
log.mkdir(parents=True, exist_ok=True)
(log / f"{argv[0] if argv else 'none'}-{os.getpid()}-{time.monotonic_ns()}.json").write_text(json.dumps(rec))
'''


@pytest.fixture
def fake_slidemil(tmp_path):
    """Env for sbatch under which `python -m slidemil ...` records its call in FAKE_LOG."""
    pkg = tmp_path / "fake" / "slidemil"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(FAKE_MAIN))
    log = tmp_path / "calls"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "PYTHON": sys.executable,
           "FAKE_LOG": str(log)}
    env.pop("OMP_NUM_THREADS", None)

    def calls(command: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(log.glob(f"{command}-*.json"))]

    return env, calls


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("array,ids", [("0-2", [0, 1, 2]), ("2-6:2", [2, 4, 6])])
def test_cv_array_plumbing_summary_after_the_last_fold(live_slurm, tmp_path, fake_slidemil, array, ids):
    env, calls = fake_slidemil
    out = tmp_path / "cv"
    env.update(METADATA="/data/m.csv", FEATURES="/data/f", OUT=str(out), FOLDS="3")
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", f"--array={array}", "--cpus-per-task=1",
                            f"--output={tmp_path}/cv-%A_%a.out", str(REPO / "slurm" / "cv_array.sbatch")],
                           wait=True, env=env, cwd=tmp_path, timeout=240)
    assert rc == 0, "\n".join(p.read_text() for p in tmp_path.glob("cv-*.out"))
    # task ids[i] runs fold i, and logs it
    assert {c["env"]["SLURM_ARRAY_TASK_ID"]: _arg(c["argv"], "--fold") for c in calls("train")} == \
        {str(task): str(fold) for fold, task in enumerate(ids)}
    for fold, task in enumerate(ids):
        assert f"array task {task}: fold {fold} of 3" in (tmp_path / f"cv-{job_id}_{task}.out").read_text()
    for c in calls("train"):
        assert _arg(c["argv"], "--folds") == "3" and "--resume" in c["argv"]
        assert _arg(c["argv"], "--out") == str(out)
    summaries = calls("cv-summary")
    assert summaries, "no task wrote the summary"
    assert all(s["folds_done"] == ["fold_0", "fold_1", "fold_2"] for s in summaries)
    assert (out / "cv_summary.csv").exists()


def test_cv_array_failed_fold_fails_and_skips_summary(live_slurm, tmp_path, fake_slidemil):
    env, calls = fake_slidemil
    env.update(OUT=str(tmp_path / "cv"), FOLDS="2", FAKE_FAIL="train")
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=0-1", "--cpus-per-task=1",
                            f"--output={tmp_path}/cv-%A_%a.out", str(REPO / "slurm" / "cv_array.sbatch")],
                           wait=True, env=env, cwd=tmp_path, timeout=240)
    assert rc == 2
    assert "stand-in failure of train" in (tmp_path / f"cv-{job_id}_0.out").read_text()
    assert not calls("cv-summary") and not (tmp_path / "cv" / "cv_summary.csv").exists()


@pytest.mark.parametrize("script,command", [("score_array.sbatch", "score"),
                                            ("extract_array.sbatch", "extract")])
def test_array_shards_cover_every_index_once(live_slurm, tmp_path, fake_slidemil, script, command):
    env, calls = fake_slidemil
    env.update(MODEL="/models/pkg", SLIDES="/data/slides/*.svs", COORDS="/data/coords",
               OUT=str(tmp_path / "out"), BACKBONE="tiny_cnn")
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=0-3", "--cpus-per-task=1",
                            f"--output={tmp_path}/a-%A_%a.out", str(REPO / "slurm" / script), "--top-k", "2"],
                           wait=True, env=env, cwd=tmp_path, timeout=240)
    assert rc == 0, "\n".join(p.read_text() for p in tmp_path.glob("a-*.out"))
    runs = calls(command)
    assert sorted(_arg(c["argv"], "--shard") for c in runs) == ["0/4", "1/4", "2/4", "3/4"]
    for c in runs:
        argv = c["argv"]
        assert _arg(argv, "--out") == str(tmp_path / "out") and argv[-2:] == ["--top-k", "2"]
        if command == "score":
            assert argv[1:3] == ["/models/pkg", "/data/slides/*.svs"]  # the glob reaches slidemil unexpanded
        else:
            assert argv[1] == "/data/slides/*.svs" and _arg(argv, "--coords") == "/data/coords"
            assert _arg(argv, "--backbone") == "tiny_cnn"
    # rerunning one task alone needs NUM_SHARDS; without it the script refuses instead of mis-sharding
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=2", f"--output={tmp_path}/b-%A_%a.out",
                            str(REPO / "slurm" / script)], wait=True, env=env, cwd=tmp_path, timeout=120)
    assert rc == 2 and "NUM_SHARDS" in (tmp_path / f"b-{job_id}_2.out").read_text()
    assert len(calls(command)) == 4
    # with NUM_SHARDS the id is the 0-based shard index
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=2", f"--output={tmp_path}/c-%A_%a.out",
                            str(REPO / "slurm" / script)], wait=True, env={**env, "NUM_SHARDS": "4"},
                           cwd=tmp_path, timeout=120)
    assert rc == 0, (tmp_path / f"c-{job_id}_2.out").read_text()
    assert sorted(_arg(c["argv"], "--shard") for c in calls(command)) == ["0/4", "1/4", "2/4", "2/4", "3/4"]


@pytest.mark.parametrize("array,ids", [("1-4", [1, 2, 3, 4]), ("5-11:2", [5, 7, 9, 11])])
def test_array_ids_from_any_first_id_run_shards_0_to_n(live_slurm, tmp_path, fake_slidemil, array, ids):
    env, calls = fake_slidemil
    env.update(MODEL="/models/pkg", SLIDES="/data/slides", OUT=str(tmp_path / "out"))
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", f"--array={array}", "--cpus-per-task=1",
                            f"--output={tmp_path}/a-%A_%a.out", str(REPO / "slurm" / "score_array.sbatch")],
                           wait=True, env=env, cwd=tmp_path, timeout=240)
    assert rc == 0, "\n".join(p.read_text() for p in tmp_path.glob("a-*.out"))
    # every shard exactly once, task ids[i] running shard i/4
    assert {c["env"]["SLURM_ARRAY_TASK_ID"]: _arg(c["argv"], "--shard") for c in calls("score")} == \
        {str(task): f"{shard}/4" for shard, task in enumerate(ids)}
    assert len(calls("score")) == 4
    for shard, task in enumerate(ids):
        assert f"array task {task}: shard {shard}/4" in (tmp_path / f"a-{job_id}_{task}.out").read_text()


def test_array_list_that_is_not_a_range_is_refused_by_every_task(live_slurm, tmp_path, fake_slidemil):
    env, calls = fake_slidemil
    env.update(MODEL="/models/pkg", SLIDES="/data/slides", OUT=str(tmp_path / "out"))
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=1,3,5,7", "--cpus-per-task=1",
                            f"--output={tmp_path}/a-%A_%a.out", str(REPO / "slurm" / "score_array.sbatch")],
                           wait=True, env=env, cwd=tmp_path, timeout=240)
    assert rc == 2 and not calls("score")
    for task in (1, 3, 5, 7):
        log = (tmp_path / f"a-{job_id}_{task}.out").read_text()
        assert "are a list" in log and "--array=1-7:2" in log and "--array=0-3 or --array=1-4" in log, log


# ---- slidemil extract under extract_array.sbatch -------------------------------------------


@pytest.fixture(scope="module")
def extract_array_run(live_slurm, synth_cohort, tmp_path_factory):
    """slurm/extract_array.sbatch, unchanged, as a 2-task array over the 4-slide synthetic cohort
    (tiles on the fly, test_resnet from one weights file so that both shards use the same backbone)."""
    from slidemil.models.backbones import create_backbone, save_backbone

    cohort, table = synth_cohort
    work = tmp_path_factory.mktemp("extract-array")
    model, card = create_backbone("test_resnet", "random")
    save_backbone(model, card, work / "weights")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "SLIDES": str(cohort / "slides"),
           "COORDS": "", "OUT": str(work / "feat"), "BACKBONE": "test_resnet",
           "EXTRACT_ARGS": f"--weights {work / 'weights' / 'backbone.safetensors'} --device cpu "
                           "--limit-tiles 20 --batch-size 8"}
    t0 = time.monotonic()
    rc, job_id, _ = sbatch([f"--chdir={work}", "--array=0-1", "--cpus-per-task=1",
                            f"--output={work}/extract-%A_%a.out", str(REPO / "slurm" / "extract_array.sbatch")],
                           wait=True, env=env, cwd=work, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(work.glob("extract-*.out")))
    print(f"extract array: job {job_id} rc={rc} in {time.monotonic() - t0:.1f} s")
    return rc, work / "feat", sorted(table.slide_id), logs


def test_extract_array_writes_every_slide_once(extract_array_run):
    rc, out, slide_ids, logs = extract_array_run
    assert rc == 0, logs
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == slide_ids
    from slidemil.check import check_paths
    report = check_paths([out / "features"])  # the features contract of docs/formats.md
    assert report.ok, [f.problems for f in report.findings if not f.ok]


def test_extract_array_table_lists_every_slide(extract_array_run):
    import pandas as pd

    rc, out, slide_ids, logs = extract_array_run
    assert rc == 0, logs
    table = pd.read_csv(out / "extraction.csv", dtype={"slide_id": str})
    assert sorted(table.slide_id) == slide_ids and (table.status == "ok").all()


# ---- slidemil train under train.sbatch and cv_array.sbatch ------------------------------------------

TRAIN_ARGS = ["--epochs", "30", "--patience", "0", "--seed", "1", "--workers", "0"]
TIMING_COLUMNS = ["seconds", "bags_per_s"]


@pytest.fixture(scope="module")
def feature_cohort(tmp_path_factory):
    """16 slides of hand-made features (tests/trainer_fixtures.py), 8 patients, 2 classes."""
    from tests.trainer_fixtures import make_feature_cohort

    return make_feature_cohort(tmp_path_factory.mktemp("slurm-features"), n_slides=16)


def _train_env(cohort: Path, out: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "METADATA": str(cohort / "metadata.csv"), "FEATURES": str(cohort), "OUT": str(out), **extra}
    env.pop("OMP_NUM_THREADS", None)
    return env


@pytest.fixture(scope="module")
def direct_ddp_run(feature_cohort, tmp_path_factory):
    """The reference: the same training run directly, `torchrun --nproc_per_node 2` (gloo), no Slurm."""
    out = tmp_path_factory.mktemp("direct") / "run"
    env = _train_env(feature_cohort, out, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "slidemil", "train", "--metadata", env["METADATA"], "--features", env["FEATURES"],
                        "--out", str(out), "--resume", *TRAIN_ARGS],
                       capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _same_training(run: Path, reference: Path) -> None:
    """Same files, same metrics every epoch (timing aside), same weights, same test metrics."""
    import numpy as np
    import pandas as pd
    from safetensors.numpy import load_file

    def files(d: Path) -> set[str]:
        return {p.name for p in d.iterdir() if p.is_file()}

    assert files(run) == files(reference)
    got = pd.read_csv(run / "metrics.csv").drop(columns=TIMING_COLUMNS, errors="ignore")
    want = pd.read_csv(reference / "metrics.csv").drop(columns=TIMING_COLUMNS, errors="ignore")
    assert list(got.columns) == list(want.columns) and list(got.epoch) == list(want.epoch)
    np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=0, atol=1e-6)
    for name in ("checkpoint_last.safetensors", "checkpoint_best.safetensors"):
        a, b = load_file(run / name), load_file(reference / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=f"{name}:{key}")
    assert_same_metrics(json.loads((run / "test_metrics.json").read_text()),
                        json.loads((reference / "test_metrics.json").read_text()))


def test_train_sbatch_two_cpu_ranks_match_a_direct_run(live_slurm, feature_cohort, direct_ddp_run, tmp_path):
    out = tmp_path / "run"
    env = _train_env(feature_cohort, out, CPU_PROCS="2")
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", f"--output={tmp_path}/train-%j.out",
                            str(REPO / "slurm" / "train.sbatch"), *TRAIN_ARGS],
                           wait=True, env=env, cwd=tmp_path, timeout=300)
    log = (tmp_path / f"train-{job_id}.out").read_text()
    assert rc == 0, log[-3000:]
    assert "1 node(s) x 2 rank(s)" in log and "process group: gloo, 2 ranks" in log
    _same_training(out, direct_ddp_run)


def test_train_sbatch_requeued_resumes_and_matches_an_uninterrupted_run(live_slurm, feature_cohort,
                                                                         direct_ddp_run, tmp_path):
    out = tmp_path / "run"
    env = _train_env(feature_cohort, out, CPU_PROCS="2")
    _, job_id, _ = sbatch([f"--chdir={tmp_path}", f"--output={tmp_path}/train-%j.out",
                           str(REPO / "slurm" / "train.sbatch"), *TRAIN_ARGS], env=env, cwd=tmp_path)

    def epoch_saved():
        try:
            return json.loads((out / "checkpoint_last.json").read_text())["epoch"] >= 3
        except (OSError, ValueError, KeyError):
            return False

    wait_for(epoch_saved, 180, interval=0.1, what="training to save epoch 3")
    requeued_at = json.loads((out / "checkpoint_last.json").read_text())["epoch"]
    _sh("scontrol", "requeue", job_id)
    info = wait_finished(job_id, timeout=300)
    log = (tmp_path / f"train-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    resumed = re.findall(r"resuming \S+ from epoch (\d+)", log)
    assert resumed and int(resumed[0]) >= requeued_at, log[-3000:]  # continued, did not start over
    print(f"train requeue: requeued at epoch {requeued_at}, resumed from epoch {resumed[0]}")
    _same_training(out, direct_ddp_run)


def test_cv_array_from_id_3_writes_one_fold_per_task_and_the_summary(live_slurm, feature_cohort, tmp_path):
    import pandas as pd

    out = tmp_path / "cv"
    env = _train_env(feature_cohort, out, FOLDS="3", TRAIN_ARGS="--epochs 3 --seed 1")
    # ids 3-5, none of them a fold index: task 3 runs fold 0, task 5 fold 2
    rc, job_id, _ = sbatch([f"--chdir={tmp_path}", "--array=3-5", "--cpus-per-task=1",
                            f"--output={tmp_path}/cv-%A_%a.out", str(REPO / "slurm" / "cv_array.sbatch")],
                           wait=True, env=env, cwd=tmp_path, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("cv-*.out")))
    assert rc == 0, logs[-3000:]
    for task in (3, 4, 5):
        assert f"array task {task}: fold {task - 3} of 3" in (tmp_path / f"cv-{job_id}_{task}.out").read_text()
    for fold in range(3):
        assert (out / f"fold_{fold}" / "checkpoint_best.safetensors").exists()
        assert (out / f"fold_{fold}" / "test_metrics.json").exists()
    summary = pd.read_csv(out / "cv_summary.csv")
    assert {"metric", "mean", "std", "fold_0", "fold_1", "fold_2"} <= set(summary.columns)
    assert "auc" in set(summary.metric)


# ---- slidemil score under score_array.sbatch --------------------------------------------------------


@pytest.fixture(scope="module")
def score_array_run(live_slurm, synth_cohort, extract_array_run, tmp_path_factory):
    """Train and export a package on the extract array's features, then score the cohort's 4 slides with
    slurm/score_array.sbatch as the array 1-4 (ids from 1: shards 0/4 to 3/4, one slide each)."""
    rc, features, slide_ids, logs = extract_array_run
    if rc != 0:
        pytest.skip("the extract array failed; see test_extract_array_writes_every_slide_once")
    cohort, _ = synth_cohort
    work = tmp_path_factory.mktemp("score-array")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for cmd in (["train", "--metadata", str(cohort / "metadata.csv"), "--features", str(features),
                 "--out", str(work / "run"), "--epochs", "2", "--seed", "1"],
                ["export", "--checkpoint", str(work / "run" / "checkpoint_best.safetensors"),
                 "--out", str(work / "package")]):
        r = subprocess.run([sys.executable, "-m", "slidemil", *cmd], capture_output=True, text=True, env=env,
                           cwd=work, timeout=600)
        assert r.returncode == 0, f"slidemil {cmd[0]}: {r.stderr[-3000:]}"
    env.update(PYTHON=sys.executable, MODEL=str(work / "package"), SLIDES=str(cohort / "slides"),
               OUT=str(work / "scores"), SCORE_ARGS="--device cpu --top-k 2")
    t0 = time.monotonic()
    rc, job_id, _ = sbatch([f"--chdir={work}", "--array=1-4", "--cpus-per-task=1",
                            f"--output={work}/score-%A_%a.out", str(REPO / "slurm" / "score_array.sbatch")],
                           wait=True, env=env, cwd=work, timeout=600)
    task_logs = {task: p.read_text() if (p := work / f"score-{job_id}_{task}.out").exists() else ""
                 for task in range(1, 5)}
    logs = "\n".join(task_logs.values())
    print(f"score array: job {job_id} rc={rc} in {time.monotonic() - t0:.1f} s")
    return rc, work / "scores", slide_ids, logs, task_logs


def test_score_array_scores_every_slide_once(score_array_run):
    rc, out, slide_ids, logs, _ = score_array_run
    assert rc == 0, logs[-3000:]
    assert sorted(p.stem for p in (out / "heatmaps").glob("*.npy")) == slide_ids


def test_score_array_predictions_list_every_slide_once(score_array_run):
    import pandas as pd

    rc, out, slide_ids, logs, _ = score_array_run
    assert rc == 0, logs[-3000:]
    table = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    assert sorted(table.slide_id) == slide_ids and (table.status == "ok").all()


def test_score_array_from_id_1_runs_shards_0_to_3_once(score_array_run):
    rc, out, slide_ids, logs, task_logs = score_array_run
    assert rc == 0, logs[-3000:]
    for task, log in task_logs.items():  # task k logs shard k-1 of 4, and only that one
        assert re.findall(r"array task \d+: shard \d+/\d+", log) == [f"array task {task}: shard {task - 1}/4"], log
    # one run summary per shard 0-3 (none for a shard 4/4), each scoring one of the 4 slides
    summaries = {p.name: json.loads(p.read_text()) for p in out.glob("run_summary*.json")}
    assert sorted(summaries) == [f"run_summary.shard-{i}-of-4.json" for i in range(4)]
    assert [s["scored_this_run"] for s in summaries.values()] == [1, 1, 1, 1]


# ---- requeue and resume -------------------------------------------------------------------------------

COUNTER = r'''
"""A stand-in trainer: STEPS steps, a checkpoint after each, --resume continues from it; TERM ends
the run after the current step (its checkpoint saved), as a trainer saves on preemption."""
import json, os, signal, sys, time
from pathlib import Path

state, result, starts = (Path(p) for p in sys.argv[1:4])
steps, delay = int(sys.argv[4]), float(sys.argv[5])
resume = "--resume" in sys.argv
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

step, acc = 0, 1
if resume and state.exists():
    ck = json.loads(state.read_text())
    step, acc = ck["step"], ck["acc"]
with starts.open("a") as f:
    f.write(json.dumps({"step": step, "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}) + "\n")
while step < steps:
    time.sleep(delay)
    acc = (acc * 31 + step * step + 7) % 1_000_000_007  # order-sensitive: a lost or repeated step shows
    step += 1
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "acc": acc}))
    os.replace(tmp, state)
    if stop:
        with starts.open("a") as f:
            f.write(json.dumps({"stopped_at": step}) + "\n")
        sys.exit(143)
result.write_text(json.dumps({"step": step, "acc": acc}))
'''


def test_requeue_resumes_from_checkpoint(live_slurm, tmp_path):
    steps, delay = 40, 0.2
    counter = tmp_path / "counter.py"
    counter.write_text(COUNTER)
    reference = tmp_path / "reference"
    reference.mkdir()
    subprocess.run([sys.executable, str(counter), str(reference / "state.json"), str(reference / "result.json"),
                    str(reference / "starts.jsonl"), str(steps), "0", "--resume"], check=True, timeout=60)
    expected = json.loads((reference / "result.json").read_text())

    state, result, starts = tmp_path / "state.json", tmp_path / "result.json", tmp_path / "starts.jsonl"
    job = tmp_path / "counter.sbatch"
    job.write_text(
        "#!/usr/bin/env bash\n#SBATCH --job-name=slidemil-requeue\n#SBATCH --requeue\n"
        "#SBATCH --signal=B:USR1@120\n#SBATCH --open-mode=append\n"
        "VENV=\nREQUEUE_ON_TIMEOUT=1\n"
        + _requeue_block(REPO / "slurm" / "train.sbatch")
        + f"run_requeueable {sys.executable} {counter} {state} {result} {starts} {steps} {delay} --resume\n"
        "exit $?\n")
    out = tmp_path / "requeue-%j.out"
    rc, job_id, _ = sbatch([f"--output={out}", f"--chdir={tmp_path}", str(job)], cwd=tmp_path)
    assert rc == 0

    def progress(at_least: int, restart: str):
        def check():
            info = job_info(job_id)
            if info.get("JobState") != "RUNNING" or info.get("Restarts", "0") != restart:
                return None
            try:
                return json.loads(state.read_text())["step"] >= at_least
            except (OSError, ValueError, KeyError):
                return None
        return check

    t0 = time.monotonic()
    # 1) preemption-like: scontrol requeue -> TERM to the job; the rerun resumes
    wait_for(progress(5, "0"), 60, what="first run to make progress")
    _sh("scontrol", "requeue", job_id)
    # 2) time-limit-like: USR1 to the batch shell (what --signal=B:USR1@120 sends) -> it requeues itself
    wait_for(progress(json.loads(state.read_text())["step"] + 5, "1"), 90, what="second run to make progress")
    _sh("scancel", "--signal=USR1", "--batch", job_id)
    info = wait_finished(job_id, timeout=120)
    elapsed = time.monotonic() - t0
    log = (tmp_path / f"requeue-{job_id}.out").read_text()
    print(log)
    print(f"requeue test: job {job_id} {info['JobState']} after {elapsed:.1f} s, Restarts={info['Restarts']}")

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["Restarts"] == "2"
    assert json.loads(result.read_text()) == expected  # same result as an uninterrupted run
    events = [json.loads(line) for line in starts.read_text().splitlines()]
    runs = [e for e in events if "restart" in e]
    stops = [e["stopped_at"] for e in events if "stopped_at" in e]
    assert [r["restart"] for r in runs] == ["0", "1", "2"], events
    # each stopped run saved at TERM, and the next run went on from exactly there (not from step 0)
    assert runs[0]["step"] == 0 and [r["step"] for r in runs[1:]] == stops, events
    assert 0 < stops[0] < stops[1] < steps, events
    print(f"requeue test: runs started at steps {[r['step'] for r in runs]}, stopped at {stops}; "
          f"result {json.loads(result.read_text())} == uninterrupted {expected}")
    assert "DUE TO JOB REQUEUE" in log and "TERM: stopping" in log and "USR1: time limit near" in log
