"""Tests for the benchmark result schema and report."""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import charts, grouping, report
from bench.schema import Results, SchemaError, read_json, write_json

FIXTURES = Path(__file__).parent / "fixtures"
CPU_FILE = FIXTURES / "bench_results.json"
GPU_FILE = FIXTURES / "bench_results_gpu.json"
ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DELETE = object()


def raw(path=CPU_FILE):
    """The fixture as parsed JSON."""
    return json.loads(path.read_text())


def merged():
    """Both fixtures merged."""
    return grouping.load_results([CPU_FILE, GPU_FILE])


def raw_runs(*paths):
    """(machine_id, run dict) for every run of the given fixtures."""
    docs = [raw(path) for path in paths]
    return [(doc["environment"]["machine_id"], run) for doc in docs for run in doc["runs"]]


def group_of(run):
    """A run dict's comparison group."""
    return tuple(run[k] for k in ("model", "width", "height", "steps", "batch"))


def run_key(machine, run):
    """(machine, group, backend, provider, variant) of a run dict: how tests find its row."""
    return (machine, group_of(run), run["backend"], run["provider"], run["variant"])


def references_by_machine(*paths):
    """(machine, group) -> measured reference run dict."""
    runs = raw_runs(*paths)
    return {(m, group_of(r)): r for m, r in runs if r["reference"] and r["status"] == "ok"}


def expected_speedups(*paths):
    """(machine, group, backend, provider, variant) -> "N.NNx", computed from the raw fixtures."""
    refs = references_by_machine(*paths)
    out = {}
    for machine, run in raw_runs(*paths):
        ref = refs.get((machine, group_of(run)))
        if ref and not run["reference"] and run["status"] == "ok":
            out[run_key(machine, run)] = f"{ref['steady_s'] / run['steady_s']:.2f}x"
    return out


def tables(md):
    """Group title -> list of row dicts, from the report's group tables."""
    out = {}
    for section in md.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        lines = [line for line in body.splitlines() if line.startswith("| ")]
        if not lines or not lines[0].startswith("| machine |"):
            continue
        header = [c.strip() for c in lines[0].strip("|").split(" | ")]
        out[title] = [dict(zip(header, (c.strip() for c in line.strip("|").split(" | "))))
                      for line in lines[2:]]
    return out


def row(md, run_key):
    """The table row for (machine, group, backend, provider, variant)."""
    machine, group, backend, provider, variant = run_key
    rows = tables(md)[grouping.group_title(group)]
    hits = [r for r in rows if (r["machine"], r["backend"], r["provider"], r["variant"])
            == (machine, backend, provider or "-", variant or "-")]
    assert len(hits) == 1, (run_key, rows)
    return hits[0]


def set_path(data, path, value):
    """Set (or delete) a dotted path like "runs.0.stages.unet_step_s"."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parents:
        data = data[part]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


# ---- schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CPU_FILE, GPU_FILE])
def test_round_trip(path):
    """dict -> Results -> dict is lossless and Results -> dict -> Results is identity."""
    results = Results.from_dict(raw(path))
    assert results.to_dict() == raw(path)
    assert Results.from_dict(results.to_dict()) == results


def test_merged_round_trip(tmp_path):
    """A merged document survives writing and reading."""
    results = merged()
    assert Results.from_dict(json.loads(json.dumps(results.to_dict()))) == results
    assert read_json(write_json(results, tmp_path / "m.json")) == results
    assert os.listdir(tmp_path) == ["m.json"]


def test_missing_optional_fields_default_to_null():
    """Optional run fields may be left out."""
    doc = raw()
    doc["runs"] = [{"backend": "runtime-ort", "model": "tiny", "width": 64, "height": 64,
                    "steps": 4, "batch": 1, "reference": False, "status": "ok"}]
    run = Results.from_dict(doc).runs[0]
    assert run.machine_id == "cpu-box"
    assert (run.provider, run.steady_s, run.stages, run.image_diff) == (None, None, None, None)


@pytest.mark.parametrize("path, value, field", [
    ("schema_version", 2, "schema_version"),
    ("created", "yesterday", "created"),
    ("environment.machine_id", DELETE, "environment.machine_id"),
    ("environment.cores", "two", "environment.cores"),
    ("runs.0.steps", 0, "runs[0].steps"),
    ("runs.0.backend", "tensorflow", "runs[0].backend"),
    ("runs.1.provider", "metal", "runs[1].provider"),
    ("runs.1.status", "done", "runs[1].status"),
    ("runs.1.reference", "no", "runs[1].reference"),
    ("runs.1.steady_s", -1.0, "runs[1].steady_s"),
    ("runs.1.stages.unet_step_s", "fast", "runs[1].stages.unet_step_s"),
    ("runs.1.image_diff.psnr_db", DELETE, "runs[1].image_diff.psnr_db"),
    ("runs.1.stedy_s", 1.0, "runs[1].stedy_s"),
    ("runs.3.reason", None, "runs[3].reason"),
    ("runs.1.reference", True, "runs[1].reference"),
    ("runs.0.image_diff", {"max_abs": 0.0, "psnr_db": 99.0}, "runs[0].image_diff"),
    ("runs.2.machine_id", "other-box", "runs[2].machine_id"),
])
def test_validation_error_names_field(path, value, field):
    """A bad field gives a ValueError that names it."""
    doc = copy.deepcopy(raw())
    set_path(doc, path, value)
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: "):
        Results.from_dict(doc)


def test_read_json_errors_name_the_file(tmp_path):
    """File errors start with the file name."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SchemaError, match="bad.json: invalid JSON"):
        read_json(bad)


# ---- markdown -----------------------------------------------------------------------------


def test_markdown_speedups_match_fixture():
    """Every measured run shows reference steady / run steady of its own machine."""
    md = report.markdown(grouping.load_results(CPU_FILE))
    expected = expected_speedups(CPU_FILE)
    assert len(expected) >= 2 and "2.00x" in expected.values()
    for key, text in expected.items():
        assert row(md, key)["speed-up"] == text


def test_markdown_overhead_and_diff_columns():
    """Overhead is a share of the UNet step; image diff is shown against the reference."""
    run = raw()["runs"][1]
    cells = row(report.markdown(grouping.load_results(CPU_FILE)), run_key("cpu-box", run))
    share = 100 * run["stages"]["scheduler_overhead_s"] / run["stages"]["unet_step_s"]
    assert cells["overhead / step"] == f"{share:.1f}%"
    assert cells["PSNR"] == f"{run['image_diff']['psnr_db']:.1f} dB"
    assert cells["status"] == "ok"


def test_no_same_machine_reference_is_na():
    """Runs whose machine has no usable reference print n/a, also when merged."""
    for md in (report.markdown(grouping.load_results(CPU_FILE)), report.markdown(merged())):
        measured = [run_key(m, r) for m, r in raw_runs(CPU_FILE)
                    if r["status"] == "ok" and not r["reference"]]
        without_reference = [key for key in measured if key not in expected_speedups(CPU_FILE)]
        assert len(without_reference) >= 2
        for key in without_reference:
            assert row(md, key)["speed-up"] == "n/a"


def test_skipped_and_failed_runs_listed_with_reason():
    """Runs that did not complete show their status and reason."""
    md = report.markdown(grouping.load_results(CPU_FILE))
    problems = [(m, r) for m, r in raw_runs(CPU_FILE) if r["status"] != "ok"]
    assert {r["status"] for _, r in problems} == {"skipped", "failed"}
    for machine, run in problems:
        assert row(md, run_key(machine, run))["status"] == run["status"]
        assert f"- {run['status']}: {machine}: " in md and f"— {run['reason']}" in md


# ---- merge --------------------------------------------------------------------------------


def test_merge_keeps_machines_and_compares_within_machine():
    """GPU runs are compared with the GPU machine's reference, CPU runs with the CPU one."""
    results = merged()
    assert results.machines == ("cpu-box", "gpu-box")
    assert len(results.runs) == len(raw()["runs"]) + len(raw(GPU_FILE)["runs"])
    md = report.markdown(results)
    assert "## Environment: cpu-box" in md and "## Environment: gpu-box" in md
    expected = expected_speedups(CPU_FILE, GPU_FILE)
    assert expected == {**expected_speedups(CPU_FILE), **expected_speedups(GPU_FILE)}
    for key, text in expected.items():
        assert row(md, key)["speed-up"] == text
    cpu_refs = {group: r for (_, group), r in references_by_machine(CPU_FILE).items()}
    gpu_runs = [r for _, r in raw_runs(GPU_FILE) if r["status"] == "ok" and not r["reference"]]
    compared = [(r, cpu_refs[group_of(r)]) for r in gpu_runs if group_of(r) in cpu_refs]
    assert compared
    for run, cpu_ref in compared:
        wrong = f"{cpu_ref['steady_s'] / run['steady_s']:.2f}x"
        assert row(md, run_key("gpu-box", run))["speed-up"] != wrong


def test_merge_deduplicates_identical_runs():
    """Merging a file with itself keeps each run once."""
    assert grouping.load_results([CPU_FILE, CPU_FILE]).runs == grouping.load_results(CPU_FILE).runs


def test_merge_rejects_mixed_versions_and_conflicting_machines():
    """Different schema versions, or one machine_id with two environments, are errors."""
    cpu, gpu = read_json(CPU_FILE), read_json(GPU_FILE)
    with pytest.raises(ValueError, match="^schema_version: "):
        grouping.merge([cpu, dataclasses.replace(gpu, schema_version=2)])
    env = dataclasses.replace(gpu.environments[0], machine_id="cpu-box")
    runs = tuple(dataclasses.replace(r, machine_id="cpu-box") for r in gpu.runs)
    with pytest.raises(ValueError, match="'cpu-box' is described differently"):
        grouping.merge([cpu, dataclasses.replace(gpu, environments=(env,), runs=runs)])


def test_merge_rejects_two_references_for_one_group():
    """Two different references of one machine and group are an error naming the run."""
    cpu = read_json(CPU_FILE)
    other = dataclasses.replace(cpu, runs=(dataclasses.replace(cpu.runs[0], steady_s=11.0),))
    with pytest.raises(ValueError, match=r"^runs\[\d+\]\.reference: a second reference"):
        grouping.merge([cpu, other])


# ---- charts and output --------------------------------------------------------------------


def test_charts_are_png_files(tmp_path):
    """One stage chart per group with measured runs, plus the speed-up chart."""
    results = merged()
    paths = report.charts(results, tmp_path)
    expected = [grouping.chart_name(key) for key in grouping.groups(results)] + [charts.SPEEDUP_CHART]
    assert [p.name for p in paths] == expected
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert [p.name for p in report.charts(results, tmp_path / "again")] == expected


def test_write_report_leaves_only_outputs(tmp_path):
    """A written report holds results.json, report.md and the charts, nothing temporary."""
    written = report.write_report(merged(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in written)
    assert {"results.json", "report.md", charts.SPEEDUP_CHART} <= set(os.listdir(tmp_path))
    assert read_json(tmp_path / "results.json") == merged()
    assert "(speedup.png)" in (tmp_path / "report.md").read_text()


def test_write_report_failure_keeps_old_report(tmp_path, monkeypatch):
    """A failure while rendering changes nothing and leaves no temporary files."""
    report.write_report(read_json(CPU_FILE), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "markdown", broken)
    with pytest.raises(RuntimeError):
        report.write_report(merged(), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


# ---- command line -------------------------------------------------------------------------


def test_cli_merge_and_render(tmp_path, capsys):
    """merge writes a report; render re-renders the merged results.json."""
    assert report.main(["merge", str(CPU_FILE), str(GPU_FILE), "--out", str(tmp_path / "a")]) == 0
    merged_file = str(tmp_path / "a" / "results.json")
    assert report.main(["render", merged_file, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()
    assert capsys.readouterr().err == ""


def bad_inputs(tmp_path):
    """Paths to a missing file, invalid JSON and a schema error."""
    (tmp_path / "broken.json").write_text('{"schema_version": 1,')
    doc = raw()
    doc["runs"][0]["steps"] = "many"
    (tmp_path / "invalid.json").write_text(json.dumps(doc))
    return {"missing.json": tmp_path / "missing.json", "broken.json": tmp_path / "broken.json",
            "runs[0].steps": tmp_path / "invalid.json"}


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """Each kind of bad input gives exit code 2 and a one-line message naming the problem."""
    for needle, path in bad_inputs(tmp_path).items():
        assert report.main(["merge", str(CPU_FILE), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_cli_module_entry_point(tmp_path):
    """python -m bench.report reports bad input without a traceback."""
    cmd = [sys.executable, "-m", "bench.report", "render", str(tmp_path / "nope.json"),
           "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "nope.json" in proc.stderr
    assert "Traceback" not in proc.stderr
