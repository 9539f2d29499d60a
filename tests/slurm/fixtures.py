"""A live one-node Slurm for the tests marked ``slurm``, and small helpers to drive it.

``live_slurm`` (session scope) uses a Slurm that already answers (started by ``.ci/run`` through
``tests/slurm/start_slurm.sh``, or a real one); otherwise it runs ``start_slurm.sh`` itself and, at the
end of the session, stops exactly the daemons that this call started. Where Slurm cannot be started
(not root, no apt-get, the daemons fail) the tests skip with the reason; ``SLIDEMIL_REQUIRE_SLURM=1``
turns that skip into a failure (for CI, where a silent skip would hide a broken setup).

Register it in ``tests/conftest.py`` with::

    from tests.slurm.fixtures import live_slurm  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
START = HERE / "start_slurm.sh"
STOP = HERE / "stop_slurm.sh"

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class LiveSlurm:
    node: str
    partition: str
    cpus: int
    started_here: bool


def _run(cmd: Sequence[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def _sinfo_node() -> tuple[str, str, str, int] | None:
    """(node, state, partition, cpus) of the first node when sinfo answers, else None."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return None
    try:  # `scontrol ping` answers at once; sinfo retries a silent controller for ~10 s
        if _run(["scontrol", "ping"], timeout=15).returncode != 0:
            return None
        r = _run(["sinfo", "-h", "-N", "-o", "%N|%T|%P|%c"], timeout=15)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    node, state, partition, cpus = r.stdout.splitlines()[0].split("|")
    return node, state, partition.rstrip("*"), int(cpus)


def _unavailable(reason: str) -> None:
    if os.environ.get("SLIDEMIL_REQUIRE_SLURM") == "1":
        pytest.fail(f"live Slurm required (SLIDEMIL_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(f"no live Slurm: {reason}")


@pytest.fixture(scope="session")
def live_slurm() -> Iterator[LiveSlurm]:
    info = _sinfo_node()
    if info is not None and info[1].startswith(("idle", "mix", "alloc", "comp")):
        yield LiveSlurm(node=info[0], partition=info[2], cpus=info[3], started_here=False)
        return
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("sinfo does not answer and starting a local Slurm needs root")
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        _unavailable("slurm is not installed and apt-get is unavailable to install it")
    state = Path(tempfile.mkdtemp(prefix="slidemil-slurm-"))
    env = {**os.environ, "SLIDEMIL_SLURM_STATE": str(state)}
    try:
        r = _run(["bash", str(START)], timeout=900, env=env)
    except subprocess.TimeoutExpired:
        _unavailable("tests/slurm/start_slurm.sh did not finish in 900 s")
    if r.returncode != 0:
        _run(["bash", str(STOP)], env=env)
        _unavailable(f"tests/slurm/start_slurm.sh failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    info = _sinfo_node()
    if info is None:
        _run(["bash", str(STOP)], env=env)
        _unavailable("start_slurm.sh succeeded but sinfo does not answer")
    try:
        yield LiveSlurm(node=info[0], partition=info[2], cpus=info[3], started_here=True)
    finally:
        stop = _run(["bash", str(STOP)], timeout=120, env=env)
        if stop.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)


# ---- helpers for the tests ------------------------------------------------------------------------


def sbatch(args: Sequence[str], *, wait: bool = False, env: dict[str, str] | None = None,
           cwd: str | Path | None = None, timeout: float = 300) -> tuple[int, str, subprocess.CompletedProcess[str]]:
    """Submit with ``sbatch --parsable``; returns (exit status, job id, sbatch's process).

    With ``wait`` the exit status is the job's, as ``sbatch --wait`` gives it (the highest of an
    array's tasks; 1 for a job ended by a signal), but found by polling ``scontrol`` every 0.2 s:
    ``sbatch --wait`` polls at growing intervals and adds seconds to every short job."""
    cmd = ["sbatch", "--parsable", *args]
    r = _run(cmd, timeout=60, env=env, cwd=cwd)
    job_id = r.stdout.strip().splitlines()[0].split(";")[0] if r.stdout.strip() else ""
    if r.returncode != 0 or not job_id:
        raise AssertionError(f"sbatch failed: {' '.join(cmd)}\n{r.stderr}")
    if not wait:
        return r.returncode, job_id, r
    wait_finished(job_id, timeout=timeout)
    status = 0
    for rec in array_states(job_id):
        code, _, sig = rec.get("ExitCode", "0:0").partition(":")
        status = max(status, int(code) if int(sig or 0) == 0 else max(int(code), 1))
        if rec.get("JobState") != "COMPLETED":
            status = max(status, 1)
    return status, job_id, r


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (records stay MinJobAge = 300 s after the job ends).

    For an array job, the first task's record."""
    r = _run(["scontrol", "show", "job", "-o", job_id])
    if r.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id}: {r.stderr.strip()}")
    line = r.stdout.strip().splitlines()[0]
    out: dict[str, str] = {}
    for token in line.split(" "):
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


def array_states(job_id: str) -> list[dict[str, str]]:
    """One ``scontrol show job -o`` record per task of an array job."""
    r = _run(["scontrol", "show", "job", "-o", job_id])
    records = []
    for line in r.stdout.strip().splitlines():
        rec = {}
        for token in line.split(" "):
            key, sep, value = token.partition("=")
            if sep:
                rec[key] = value
        records.append(rec)
    return records


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value; returns it, or fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_finished(job_id: str, timeout: float = 300) -> dict[str, str]:
    """Wait until the job (every task of an array) has finished; returns the last record."""
    def done():
        recs = array_states(job_id)
        if recs and all(r.get("JobState") in FINISHED for r in recs):
            return recs[-1]
        return None

    return wait_for(done, timeout, what=f"job {job_id} to finish")


def jobcomp_records(job_id: str, path: str = "/var/log/slurm/jobcomp.log") -> list[str]:
    """Lines of the jobcomp/filetxt log for the job (what sacct would show; accounting is off)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.startswith(f"JobId={job_id} ")]
