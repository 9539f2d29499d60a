"""The container image: its recipe (always), and the built image against the host (``-m container``).

- Default suite, no container engine: docker/Dockerfile is one recipe for the CPU and GPU images with a
  non-root user, ``ENTRYPOINT ["slidemil"]``, a ``slidemil doctor`` HEALTHCHECK, OCI labels (version,
  licence), the read-only mounts documented, nothing secret baked in and the wheels kept out of the final
  image; .dockerignore lets in what the recipe reads; ``compare_score_outputs`` catches what it names.
- ``-m container`` (deselected by default; .ci/container.sh builds the CPU image and runs these): the
  image's ``slidemil --version`` and ``doctor``, and ``slidemil score`` in the container (non-root, model
  and slides mounted read-only, no network, outputs to a mounted folder) against the same command on
  the host: the same output files, and predictions equal within 1e-6.

Environment of the container tests: SLIDEMIL_CONTAINER_IMAGE (the image; the tests skip without it) and
SLIDEMIL_CONTAINER_RUN (the run command before the image, default ``podman run --rm``; CI's adds the
runtime, ulimits and ``--network=none``, see .ci/container.sh; ``docker run --rm`` works too).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
PROB_ATOL = 1e-6

IMAGE = os.environ.get("SLIDEMIL_CONTAINER_IMAGE", "")
RUN = shlex.split(os.environ.get("SLIDEMIL_CONTAINER_RUN", "podman run --rm"))

container = pytest.mark.container

needs_image = pytest.mark.skipif(not IMAGE, reason="SLIDEMIL_CONTAINER_IMAGE is not set (.ci/container.sh sets it)")


# -- the comparison ------------------------------------------------------------------------------

def output_files(out: Path) -> set[str]:
    """Every file under a scoring output folder, as paths relative to it."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def _predictions(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def compare_score_outputs(a: Path, b: Path, atol: float = PROB_ATOL,
                          attention_atol: float | None = None) -> list[str]:
    """What differs between two ``slidemil score`` output folders of the same slides and model; [] if nothing.

    The same set of files (names); in predictions.csv the same slide ids, status, predicted class and
    probability columns, every probability within ``atol``. With ``attention_atol``, the heatmaps
    (``heatmaps/<id>.npy``) too: same grid, NaN (off tissue) at the same cells, values within it.
    """
    problems = []
    fa, fb = output_files(a), output_files(b)
    if fa != fb:
        problems.append(f"output files differ: only in {a}: {sorted(fa - fb)}; only in {b}: {sorted(fb - fa)}")
    if not (a / "predictions.csv").is_file() or not (b / "predictions.csv").is_file():
        return problems + [f"predictions.csv missing in {a} or {b}"]
    pa, pb = _predictions(a), _predictions(b)
    if set(pa) != set(pb):
        problems.append(f"slide ids differ: {sorted(pa)} vs {sorted(pb)}")
    for slide in sorted(set(pa) & set(pb)):
        ra, rb = pa[slide], pb[slide]
        for key in ("status", "pred_class", "pred_index"):
            if ra.get(key) != rb.get(key):
                problems.append(f"{slide}: {key} {ra.get(key)!r} vs {rb.get(key)!r}")
        probs_a = {k for k in ra if k.startswith("prob_") or ":prob_" in k}
        probs_b = {k for k in rb if k.startswith("prob_") or ":prob_" in k}
        if probs_a != probs_b or not probs_a:
            problems.append(f"{slide}: probability columns differ: {sorted(probs_a)} vs {sorted(probs_b)}")
        for key in sorted(probs_a & probs_b):
            try:
                x, y = float(ra[key]), float(rb[key])
            except ValueError:
                problems.append(f"{slide}: {key} is not a number: {ra[key]!r} vs {rb[key]!r}")
                continue
            if not (math.isfinite(x) and math.isfinite(y) and abs(x - y) <= atol):
                problems.append(f"{slide}: {key} {x!r} vs {y!r} (difference {abs(x - y):.3g} > {atol:g})")
        if attention_atol is not None:
            problems += _compare_heatmap(a, b, slide, attention_atol)
    return problems


def _compare_heatmap(a: Path, b: Path, slide: str, atol: float) -> list[str]:
    ha, hb = a / "heatmaps" / f"{slide}.npy", b / "heatmaps" / f"{slide}.npy"
    if not ha.is_file() or not hb.is_file():
        return [f"{slide}: heatmap missing"]
    xa, xb = np.load(ha), np.load(hb)
    if xa.shape != xb.shape:
        return [f"{slide}: heatmap shape {xa.shape} vs {xb.shape}"]
    if not np.array_equal(np.isnan(xa), np.isnan(xb)):
        return [f"{slide}: heatmap tissue cells (non-NaN) differ"]
    diff = float(np.nanmax(np.abs(xa - xb), initial=0.0))
    return [f"{slide}: heatmap differs by {diff:.3g} > {atol:g}"] if diff > atol else []


def max_heatmap_difference(a: Path, b: Path) -> float:
    """Largest attention difference over the heatmaps both folders hold (for the log)."""
    worst = 0.0
    for ha in (a / "heatmaps").glob("*.npy"):
        hb = b / "heatmaps" / ha.name
        if hb.is_file():
            xa, xb = np.load(ha), np.load(hb)
            if xa.shape == xb.shape:
                worst = max(worst, float(np.nanmax(np.abs(xa - xb), initial=0.0)))
    return worst


def _fake_output(out: Path, probs: tuple[float, float], slides: tuple[str, ...] = ("s1",),
                 extra: str | None = None) -> Path:
    (out / "heatmaps").mkdir(parents=True)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "status", "error", "pred_class", "pred_index", "prob_a", "prob_b", "n_tiles"])
        for s in slides:
            w.writerow([s, "ok", "", "b" if probs[1] > probs[0] else "a", int(probs[1] > probs[0]), *probs, 4])
    for s in slides:
        np.save(out / "heatmaps" / f"{s}.npy", np.array([[0.5, np.nan], [probs[1], 0.0]], np.float32))
    (out / "run_summary.json").write_text(json.dumps({"slides": len(slides)}))
    if extra:
        (out / extra).write_text("x")
    return out


def test_compare_score_outputs_catches_what_it_names(tmp_path):
    ref = _fake_output(tmp_path / "ref", (0.25, 0.75))
    assert compare_score_outputs(ref, _fake_output(tmp_path / "same", (0.25, 0.75)), attention_atol=0) == []
    assert compare_score_outputs(ref, _fake_output(tmp_path / "close", (0.25 + 5e-7, 0.75 - 5e-7))) == []
    far = compare_score_outputs(ref, _fake_output(tmp_path / "far", (0.25 + 3e-6, 0.75 - 3e-6)))
    assert len(far) == 2 and all("> 1e-06" in p for p in far), far
    flipped = compare_score_outputs(ref, _fake_output(tmp_path / "flip", (0.75, 0.25)))
    assert any("pred_class" in p for p in flipped) and any("pred_index" in p for p in flipped)
    extra = compare_score_outputs(ref, _fake_output(tmp_path / "extra", (0.25, 0.75), extra="more.txt"))
    assert extra == [f"output files differ: only in {ref}: []; only in {tmp_path / 'extra'}: ['more.txt']"]
    other = compare_score_outputs(ref, _fake_output(tmp_path / "other", (0.25, 0.75), slides=("s2",)))
    assert any("slide ids differ" in p for p in other) and any("output files differ" in p for p in other)
    att = compare_score_outputs(ref, _fake_output(tmp_path / "att", (0.25, 0.75 + 1e-7)), attention_atol=1e-9)
    assert len(att) == 1 and "heatmap differs" in att[0], att
    (tmp_path / "empty").mkdir()
    assert any("predictions.csv missing" in p for p in compare_score_outputs(ref, tmp_path / "empty"))


# -- the recipe (static) ---------------------------------------------------------------------------

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


TEXT = DOCKERFILE.read_text()
INSTRUCTIONS = _instructions(TEXT)
FINAL = _stages(INSTRUCTIONS)[-1]


def _final(word: str) -> list[str]:
    return [args for w, args in FINAL if w == word]


def test_one_recipe_for_both_variants():
    assert not (REPO / "docker" / "Dockerfile.cpu").exists(), "docker/Dockerfile builds both variants"
    first_from = next(i for i, (w, _) in enumerate(INSTRUCTIONS) if w == "FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in INSTRUCTIONS[:first_from]
    assert INSTRUCTIONS[first_from] == ("FROM", "${BASE_IMAGE} AS base")
    assert [args.split()[-1] for w, args in INSTRUCTIONS if w == "FROM"] == ["base", "build", "runtime"]
    assert "ARG VARIANT=cpu" in "\n".join(f"{w} {a}" for w, a in FINAL)
    # onnxruntime-gpu replaces onnxruntime: the gpu variant drops the onnxruntime wheel from the set
    assert 'if [ "${VARIANT}" = gpu ]; then rm /wheelhouse/deps/onnxruntime-[0-9]*.whl; fi' in TEXT
    assert 'gpu) extras="[gpu]"' in TEXT
    assert "TORCH_INDEX" in TEXT and 'ARG TORCH_INDEX=""' in TEXT


def test_runtime_runs_slidemil_as_a_non_root_user():
    users = _final("USER")
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert re.search(rf"useradd .*--uid {user}\b", TEXT), f"no user with uid {user} is created"
    assert _final("ENTRYPOINT") == ['["slidemil"]']
    health = _final("HEALTHCHECK")
    assert len(health) == 1 and health[0].endswith('CMD ["slidemil", "doctor"]'), health
    assert "chown slidemil:slidemil /out" in TEXT  # outputs writable by that user


def test_labels_version_licence_and_mounts():
    labels = " ".join(_final("LABEL"))
    assert 'org.opencontainers.image.version="${SLIDEMIL_VERSION}"' in labels
    licence = re.search(r'^license = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert licence and f'org.opencontainers.image.licenses="{licence.group(1)}"' in labels
    assert licence.group(1) == "Apache-2.0"
    assert "/models: model packages (read-only); /slides: slides (read-only); /out: outputs" in labels
    header = TEXT[:TEXT.index("ARG BASE_IMAGE")]
    assert "-v /data/models:/models:ro -v /data/slides:/slides:ro -v /data/out:/out" in header


def test_nothing_secret_or_heavy_is_baked_in():
    envs = " ".join(args for w, args in INSTRUCTIONS if w in ("ENV", "ARG"))
    assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", envs, re.I), envs
    assert "HF_HUB_OFFLINE=1" in " ".join(_final("ENV"))
    # the wheels reach the runtime through a build mount, never a layer; installed from them only
    from_build = [args for args in _final("COPY") if "--from=build" in args]
    assert from_build == ["--from=build /wheelhouse/deps.sha256 /opt/slidemil-wheels/deps.sha256",
                          "--from=build /wheelhouse/app.sha256 /opt/slidemil-wheels/app.sha256"], \
        f"only the wheels' checksums come from the build stage as a layer: {from_build}"
    installs = [args for args in _final("RUN") if "pip install" in args]
    assert len(installs) == 2, installs
    for args, part in zip(installs, ("deps", "app")):
        assert args.startswith("--mount=type=bind,from=build,source=/wheelhouse,target=/wheelhouse "), args
        assert f"sha256sum --check --quiet /opt/slidemil-wheels/{part}.sha256" in args
        assert f"pip install --no-index --no-deps /wheelhouse/{part}/*.whl" in args
    copied = [args for w, args in INSTRUCTIONS if w in ("COPY", "ADD")]
    assert not any(re.search(r"\.(safetensors|onnx|pt|pth|bin|plan)\b|hf|token", c, re.I) for c in copied), copied


def test_dockerignore_lets_in_what_the_recipe_reads():
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "an allowlist: everything else stays out"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    sources = []
    for w, args in INSTRUCTIONS:
        if w == "COPY" and "--from=" not in args:
            sources += [s for s in args.split()[:-1] if not s.startswith("--")]
        sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
    assert sources, "no COPY or context mount found"
    for src in sources:
        src = src.rstrip("/").removeprefix("./")
        assert src in allowed, f"{src} is read by docker/Dockerfile but left out by .dockerignore"
        assert (REPO / src).exists(), src
    assert (REPO / "docker" / "local" / ".gitignore").is_file()  # the folder exists in a clean clone


# -- the built image (-m container) ---------------------------------------------------------------

def _engine() -> list[str]:
    """The container engine with its global options: RUN up to its ``run``."""
    return RUN[:RUN.index("run")]


def _in_container(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, IMAGE, *args], capture_output=True, text=True, timeout=timeout)


def _image_uid() -> int:
    r = subprocess.run([*_engine(), "image", "inspect", "--format", "{{.Config.User}}", IMAGE],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    user = r.stdout.strip().split(":")[0]
    assert user.isdigit() and int(user) != 0, f"the image's USER is {user!r}, not a non-root uid"
    return int(user)


def _readable_by_all(root: Path) -> None:
    """pytest's temporary folders are 0700: open the model and slides to the image's user, as data shared on a
    cluster file system would be."""
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o555 if p.is_dir() else 0o444))


@container
@needs_image
def test_container_cli():
    version = _in_container("--version")
    host = subprocess.run([sys.executable, "-m", "slidemil", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == host.stdout.strip(), (version, host.stdout)
    assert _in_container("--help").returncode == 0
    if _in_container("doctor", "--help").returncode == 0:  # the HEALTHCHECK's command, where it exists
        doctor = _in_container("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr


@container
@needs_image
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0,
                    reason="the output folder is handed to the image's uid: needs root (a rootful engine)")
@pytest.mark.timeout(1800)
def test_score_in_container_matches_host(tmp_path):
    from tests.engine_fixtures import make_package_and_slides

    model, slides, _ = make_package_and_slides(tmp_path / "fixture")
    _readable_by_all(model)
    _readable_by_all(slides)
    uid = _image_uid()
    inside = tmp_path / "out_container"
    inside.mkdir()
    os.chown(inside, uid, uid)
    cmd = [*RUN, "-v", f"{model}:/models/model:ro", "-v", f"{slides}:/slides:ro", "-v", f"{inside}:/out",
           IMAGE, "score", "/models/model", "/slides", "--out", "/out"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stdout}\n{r.stderr}"

    outside = tmp_path / "out_host"
    h = subprocess.run([sys.executable, "-m", "slidemil", "score", str(model), str(slides), "--out", str(outside)],
                       capture_output=True, text=True, timeout=1200)
    assert h.returncode == 0, h.stderr

    summaries = [json.loads((d / "run_summary.json").read_text()) for d in (inside, outside)]
    problems = compare_score_outputs(inside, outside)
    owners = {p.stat().st_uid for p in [*inside.rglob("*")]}
    print(f"\ncontainer: {shlex.join(cmd)}\n"
          f"backend in / out: {summaries[0].get('backend')} / {summaries[1].get('backend')}; "
          f"files: {len(output_files(inside))} / {len(output_files(outside))}; owners of the container's "
          f"outputs: {sorted(owners)}; largest heatmap difference: {max_heatmap_difference(inside, outside):.3g}")
    for d in (inside, outside):
        print(f"{d.name}/predictions.csv:\n{(d / 'predictions.csv').read_text()}", end="")
    assert summaries[0].get("backend") == summaries[1].get("backend"), summaries
    assert not problems, "\n".join(problems)
    assert owners == {uid}, f"outputs owned by {sorted(owners)}, not the image's uid {uid}"
