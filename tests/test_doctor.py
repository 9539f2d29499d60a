"""`slidemil doctor`: rows that agree with the engine's own choices, a verdict, and no crash whatever it finds."""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from slidemil.doctor import DoctorReport, format_report, run_doctor, write_report_json
from slidemil.doctor import system as doctor_system
from slidemil.doctor.report import EXIT_FAIL, EXIT_OK, EXIT_WARN, STATUSES
from slidemil.runtime.runners import choose_backend
from tests.engine_fixtures import make_package

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    model_dir, _, _ = make_package(tmp_path_factory.mktemp("doctor"))
    return model_dir


@pytest.fixture(scope="module")
def machine_report() -> DoctorReport:
    return run_doctor()


def one(report: DoctorReport, name: str):
    rows = [c for c in report.checks if c.name == name]
    assert len(rows) == 1, f"expected one row {name!r}, got {[c.name for c in report.checks]}"
    return rows[0]


def test_runs_on_this_machine_with_the_engines_cpu_choice(machine_report):
    report = machine_report
    assert report.checks and all(c.status in STATUSES for c in report.checks)
    cpu = one(report, "backend auto (CPU)")
    assert cpu.data["backend"] == choose_backend("auto", "cpu")
    for name in ("python", "torch", "onnxruntime", "openslide", "cuda", "nvjpeg", "backend auto (GPU)"):
        one(report, name)
    assert any(c.name.startswith("cpu AVX2") for c in report.checks) or one(report, "cpu features")
    assert report.exit_code in (EXIT_OK, EXIT_WARN, EXIT_FAIL)
    lines = format_report(report)
    assert lines[-1].startswith("verdict: ") and f"(exit {report.exit_code})" in lines[-1]
    assert report.context["seconds"] < 60
    for c in report.checks:  # every row that is not ok says what to do
        assert c.status in ("ok", "info") or c.hint, c


def test_json_round_trip(machine_report, tmp_path):
    path = tmp_path / "doctor.json"
    write_report_json(machine_report, path)
    data = json.loads(path.read_text())
    assert data["exit_code"] == machine_report.exit_code and data["verdict"] == machine_report.verdict
    back = DoctorReport.from_dict(data)
    assert back == machine_report
    assert back.to_dict() == machine_report.to_dict()


def test_package_loads_and_runs_one_batch_on_the_engines_runner(package, tmp_path):
    report = run_doctor(out_dir=tmp_path, model=package)
    assert one(report, "package").status == "ok"
    runner = one(report, "package runner")
    assert runner.status == "ok" and runner.data["backend"] == choose_backend("auto", "cpu")
    assert one(report, "package smoke").status == "ok"
    assert report.context["plan"] == runner.data["backbone"]


def test_tampered_package_fails_naming_the_file(package, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(package, copy)
    with open(copy / "head.onnx", "ab") as f:
        f.write(b"\0")
    report = run_doctor(model=copy)
    row = one(report, "package")
    assert row.status == "fail" and "head.onnx" in row.detail and row.hint
    assert report.exit_code == EXIT_FAIL and "NOT READY" in report.verdict
    assert not [c for c in report.checks if c.name == "package runner"]


def test_missing_output_folder_is_reported(tmp_path, monkeypatch):
    # plenty of space: the verdict on a missing folder must not depend on the disk of the machine running the
    # tests (under 10 GB free it would be a low-disk warning; that case is test_low_disk_is_reported's)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1e12, 5e11, 5e11))
    row = one(run_doctor(out_dir=tmp_path / "a" / "b"), "output folder")
    assert row.status == "info" and "does not exist yet" in row.detail and row.data["exists"] is False
    (tmp_path / "file").write_text("x")
    assert one(run_doctor(out_dir=tmp_path / "file"), "output folder").status == "fail"


@pytest.mark.parametrize("free_gb, status, least_exit", [(500.0, "ok", EXIT_OK), (5.0, "warn", EXIT_WARN),
                                                          (0.2, "fail", EXIT_FAIL)])
def test_low_disk_is_reported(tmp_path, monkeypatch, free_gb, status, least_exit):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1e12, 1e12 - free_gb * 1e9, free_gb * 1e9))
    report = run_doctor(out_dir=tmp_path)
    row = one(report, "output folder")
    assert row.status == status and row.data["free_gb"] == pytest.approx(free_gb)
    assert report.exit_code >= least_exit


def test_unknown_backbone_is_reported():
    report = run_doctor(backbone="no_such_backbone_xyz")
    row = one(report, "backbone no_such_backbone_xyz")
    assert row.status == "fail" and "unknown backbone" in row.detail and "uni" in row.hint
    assert report.exit_code == EXIT_FAIL


def test_hub_cache_is_scanned_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = one(run_doctor(backbone="uni"), "backbone uni")
    assert row.status == "warn" and "MahmoodLab/uni" in row.detail and "gated" in row.detail
    snapshot = tmp_path / "hub" / "models--MahmoodLab--uni" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "hub" / "models--MahmoodLab--uni" / "refs").mkdir()
    (tmp_path / "hub" / "models--MahmoodLab--uni" / "refs" / "main").write_text("0" * 40)
    report = run_doctor(backbone="uni", online=True)
    assert one(report, "backbone uni").status == "ok"
    assert one(report, "backbone uni on the hub").status == "info"  # HF_HUB_OFFLINE: the hub is not asked


def test_without_openvino_the_cpu_falls_back_and_the_verdict_says_so(machine_report, monkeypatch):
    if not machine_report.checks or one(machine_report, "openvino").status != "ok":
        pytest.skip("OpenVINO is not installed here")
    assert one(machine_report, "backend auto (CPU)").status == "ok"
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    report = run_doctor()
    cpu = one(report, "backend auto (CPU)")
    assert cpu.data["backend"] == choose_backend("auto", "cpu") != "openvino"
    assert "openvino" not in cpu.data["available"]
    assert one(report, "openvino").status == "info"
    if not one(report, "cuda").data.get("available"):  # the CPU scores: a slower path is a warning
        assert cpu.status == "warn" and "pip install openvino" in cpu.hint
        assert report.exit_code >= EXIT_WARN and "backend auto (CPU)" in report.verdict


def test_a_probe_that_crashes_is_a_fail_row(monkeypatch):
    def broken():
        raise RuntimeError("library went away")
    monkeypatch.setattr(doctor_system, "openslide_row", broken)
    report = run_doctor()
    row = one(report, "openslide")
    assert row.status == "fail" and "library went away" in row.detail
    assert report.exit_code == EXIT_FAIL


def test_probe_modules_that_do_not_import_are_a_fail_row(monkeypatch):
    import slidemil.doctor
    monkeypatch.delattr(slidemil.doctor, "system", raising=False)
    monkeypatch.setitem(sys.modules, "slidemil.doctor.system", None)
    report = run_doctor()
    row = one(report, "slidemil import")
    assert row.status == "fail" and report.exit_code == EXIT_FAIL and format_report(report)[-1].startswith("verdict")


def test_the_cli_prints_the_table_and_exits_with_the_verdict(tmp_path, capsys):
    import json

    from slidemil.cli import main
    code = main(["doctor", "--out", str(tmp_path), "--json", str(tmp_path / "doctor.json")])
    out = capsys.readouterr().out
    report = DoctorReport.from_dict(json.loads((tmp_path / "doctor.json").read_text()))
    assert code == report.exit_code and out.rstrip().splitlines()[-1].startswith("verdict:")
    assert any(c.name == "backend auto (CPU)" for c in report.checks)
