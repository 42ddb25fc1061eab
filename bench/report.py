"""Benchmark report: merge result files, render markdown tables and PNG charts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from bench.charts import rendered_charts
from bench.grouping import (GroupKey, describe, group_title, groups, load_results, reference_for, references,
                            speedup)
from bench.schema import Results, Run, Stages, dumps
from runtime.atomic import atomic_file
from runtime.errors import UserError

COLUMNS = ("machine", "backend", "provider", "profile", "variant", "status", "session create",
           "first run", "steady e2e", "text encoder", "UNet / step", "VAE decode",
           "overhead / step", "peak RSS", "GPU mem", "max abs", "PSNR", "speed-up")
LEGEND = ("Times are per image batch: seconds, or ms below 1 s. *steady e2e* is the median "
          "end-to-end time of the steady-state repeats; *overhead / step* is scheduler time "
          "outside the UNet call as a share of the UNet step; *speed-up* is the steady time of "
          "the same machine's diffusers-torch reference divided by the run's steady time "
          "(n/a when that machine has no usable reference in this report).")


# ---- markdown -----------------------------------------------------------------------------


def markdown(results: Results, chart_files: Sequence[str | os.PathLike] = ()) -> str:
    """The report as markdown; chart_files are linked by file name."""
    refs = references(results)
    parts = [_header(results)]
    parts += [_group_section(key, runs, refs) for key, runs in groups(results).items()]
    parts += [_environment_section(env) for env in results.environments]
    if chart_files:
        parts.append("## Charts\n\n" + "\n\n".join(f"![{Path(p).stem}]({Path(p).name})"
                                                for p in chart_files))
    return "\n\n".join(parts) + "\n"


def _header(results: Results) -> str:
    """Title, provenance and legend."""
    machines = ", ".join(results.machines)
    return (f"# Benchmark report\n\nPreset `{results.preset}`, created {results.created}, "
            f"machines: {machines}.\n\n{LEGEND}")


def _group_section(key: GroupKey, runs: list[Run], refs: dict) -> str:
    """One table for a group, then its skipped and failed runs."""
    rows = [_cells(run, reference_for(refs, run)) for run in runs]
    text = f"## {group_title(key)}\n\n" + _table(COLUMNS, rows)
    problems = [f"- {run.status}: {describe(run)} — {_flat(run.reason)}" for run in runs
                if run.status != "ok"]
    return text + ("\n\nSkipped or failed:\n\n" + "\n".join(problems) if problems else "")


def _environment_section(env) -> str:
    """Machine and package versions of one machine."""
    rows = [("CPU", env.cpu), ("cores", env.cores), ("RAM", _unit(env.ram_gb, "GB", "g")),
            ("GPU", env.gpu or "none"), ("OS", env.os), ("Python", env.python)]
    rows += sorted(env.versions.items())
    return f"## Environment: {env.machine_id}\n\n" + _table(("item", "value"), rows)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table; None cells print as "-"."""
    lines = [header, ["---"] * len(header)] + [[_cell(c) for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _cell(value) -> str:
    """One table cell, safe for markdown."""
    return "-" if value is None or value == "" else _flat(str(value)).replace("|", "\\|")


def _flat(text: str | None) -> str:
    """Text on one line."""
    return " ".join(str(text).split())


def _cells(run: Run, ref: Run | None) -> list:
    """The table row of one run."""
    st = run.stages or Stages()
    times = (run.session_create_s, run.first_run_s, run.steady_s,
             st.text_encoder_s, st.unet_step_s, st.vae_decode_s)
    return [run.machine_id, run.backend, run.provider, _profile(run), run.variant, run.status,
            *map(_seconds, times), _percent(st.scheduler_overhead_s, st.unet_step_s),
            _unit(run.peak_rss_mb, "MB"), _unit(run.gpu_mem_mb, "MB"), *_diff_cells(run),
            _speedup_cell(run, ref)]


def _profile(run: Run) -> str | None:
    """Profile name with the start of its hash."""
    if run.profile is None or run.profile_hash is None:
        return run.profile
    return f"{run.profile} ({run.profile_hash.removeprefix('sha256:')[:8]})"


def _seconds(value: float | None) -> str | None:
    """Seconds, as ms below one second."""
    if value is None:
        return None
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _unit(value: float | None, unit: str, spec: str = ".0f") -> str | None:
    """A number with a unit."""
    return None if value is None else f"{value:{spec}} {unit}"


def _percent(part: float | None, whole: float | None) -> str | None:
    """part as a percentage of whole."""
    return None if part is None or not whole else f"{100 * part / whole:.1f}%"


def _diff_cells(run: Run) -> list:
    """Max abs and PSNR versus the reference."""
    if run.reference:
        return ["ref", "ref"]
    if run.image_diff is None:
        return ["n/a" if run.status == "ok" else None] * 2
    return [f"{run.image_diff.max_abs:.3g}", f"{run.image_diff.psnr_db:.1f} dB"]


def _speedup_cell(run: Run, ref: Run | None) -> str | None:
    """Speed-up versus the same machine's reference."""
    if run.reference or run.status != "ok":
        return "ref" if run.reference else None
    value = speedup(run, ref)
    return "n/a" if value is None else f"{value:.2f}x"


# ---- charts -------------------------------------------------------------------------------


def charts(results: Results, out_dir: str | os.PathLike) -> list[Path]:
    """Write PNG charts (stage breakdown per group, speed-ups); charts without data are skipped."""
    return write_files(out_dir, rendered_charts(results))


def write_report(results: Results, out_dir: str | os.PathLike) -> list[Path]:
    """Write results.json, report.md and charts; nothing is replaced unless all rendered."""
    pngs = rendered_charts(results)
    return write_files(out_dir, pngs | {"results.json": dumps(results).encode("utf-8"),
                                        "report.md": markdown(results, list(pngs)).encode("utf-8")})


def write_files(out_dir: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write each named file into `out_dir` (created if missing), each one atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        with atomic_file(out / name) as f:
            f.write(data)
    return [out / name for name in files]


def _parser() -> argparse.ArgumentParser:
    """Command-line parser: merge and render."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    merge_cmd = commands.add_parser("merge", help="merge result files from several machines")
    merge_cmd.add_argument("inputs", nargs="+", type=Path)
    render_cmd = commands.add_parser("render", help="render one (possibly merged) result file")
    render_cmd.add_argument("inputs", nargs=1, type=Path)
    for cmd in (merge_cmd, render_cmd):
        cmd.add_argument("--out", required=True, type=Path, help="output folder")
    return parser


def _message(exc: Exception) -> str:
    """A one-line description of an input error."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return _flat(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; bad input gives a one-line error and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        written = write_report(load_results(args.inputs), args.out)
    except (OSError, ValueError, UserError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
