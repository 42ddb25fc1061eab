"""Benchmark report: merge result files, render markdown tables and PNG charts."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from datetime import timezone
from pathlib import Path
from typing import Iterable, Sequence

from bench.schema import Results, Run, Stages, dumps, parse_time, read_json
from runtime.atomic import atomic_file
from runtime.errors import UserError

GroupKey = tuple  # (model, width, height, steps, batch)
COLUMNS = ("machine", "backend", "provider", "profile", "variant", "status", "session create",
           "first run", "steady e2e", "text encoder", "UNet / step", "VAE decode",
           "overhead / step", "peak RSS", "GPU mem", "max abs", "PSNR", "speed-up")
STAGE_PARTS = ("text encoder", "UNet total", "VAE decode", "other")
SPEEDUP_CHART = "speedup.png"
LEGEND = ("Times are per image batch: seconds, or ms below 1 s. *steady e2e* is the median "
          "end-to-end time of the steady-state repeats; *overhead / step* is scheduler time "
          "outside the UNet call as a share of the UNet step; *speed-up* is the steady time of "
          "the same machine's diffusers-torch reference divided by the run's steady time "
          "(n/a when that machine has no usable reference in this report).")


def load_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Results:
    """Load one or more result files and merge them."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return merge(read_json(path) for path in paths)


def merge(results_list: Iterable[Results]) -> Results:
    """Merge results from several machines; identical runs are kept once."""
    items = list(results_list)
    if not items:
        raise ValueError("merge: no results given")
    versions = sorted({r.schema_version for r in items})
    if len(versions) > 1:
        raise ValueError(f"schema_version: cannot merge different versions {versions}")
    return Results(schema_version=versions[0], created=max((r.created for r in items), key=_when),
                   preset="+".join(dict.fromkeys(r.preset for r in items)),
                   environments=_merge_environments(items),
                   runs=tuple(dict.fromkeys(run for r in items for run in r.runs)))


def _when(created: str):
    """Sort key for creation times; a time without a zone counts as UTC."""
    moment = parse_time(created)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _merge_environments(items: list[Results]) -> tuple:
    """One environment per machine; the same machine_id must describe the same machine."""
    envs: dict = {}
    for env in (env for r in items for env in r.environments):
        if envs.setdefault(env.machine_id, env) != env:
            raise ValueError(f"environment.machine_id: {env.machine_id!r} is described differently "
                             "in two inputs; give each environment its own machine_id")
    return tuple(envs.values())


def groups(results: Results) -> dict[GroupKey, list[Run]]:
    """Runs per (model, width, height, steps, batch), ordered by machine, reference first."""
    machine_order = {m: i for i, m in enumerate(results.machines)}
    out: dict[GroupKey, list[Run]] = {}
    for run in sorted(results.runs, key=lambda r: (machine_order[r.machine_id], not r.reference)):
        out.setdefault(run.group, []).append(run)
    return dict(sorted(out.items()))


def references(results: Results) -> dict[tuple, Run]:
    """The reference run per (machine_id, *group)."""
    return {(run.machine_id, *run.group): run for run in results.runs if run.reference}


def reference_for(refs: dict[tuple, Run], run: Run) -> Run | None:
    """The reference measured on the run's own machine for the run's group."""
    return refs.get((run.machine_id, *run.group))


def speedup(run: Run, ref: Run | None) -> float | None:
    """Reference steady time / run steady time, or None when either is unusable."""
    usable = ref is not None and run.status == ref.status == "ok"
    if not usable or not run.steady_s or ref.steady_s is None:
        return None
    return ref.steady_s / run.steady_s


def group_title(key: GroupKey) -> str:
    """Human title of a group."""
    model, width, height, steps, batch = key
    return f"{model} · {width}x{height} · {steps} steps · batch {batch}"


def describe(run: Run) -> str:
    """Short one-line label of a run."""
    parts = [run.backend, run.provider, run.profile and f"profile {run.profile}", run.variant]
    return f"{run.machine_id}: " + ", ".join(p for p in parts if p)


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


def group_slug(key: GroupKey) -> str:
    """Short file-name-safe id of a group."""
    model, width, height, steps, batch = key
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{width}x{height}-{steps}steps-b{batch}")


def chart_name(key: GroupKey) -> str:
    """File name of a group's stage chart."""
    return f"stages-{group_slug(key)}.png"


def charts(results: Results, out_dir: str | os.PathLike) -> list[Path]:
    """Write PNG charts (stage breakdown per group, speed-ups); charts without data are skipped."""
    return write_files(out_dir, rendered_charts(results))


def rendered_charts(results: Results) -> dict[str, bytes]:
    """PNG bytes by file name: a stage chart per group, then the speed-up chart; charts without data left out."""
    made = {chart_name(key): _stage_chart(key, runs) for key, runs in groups(results).items()}
    made[SPEEDUP_CHART] = _speedup_chart(results)
    return {name: png for name, png in made.items() if png is not None}


def _figure(bars: int):
    """A figure sized for a number of horizontal bars (no display needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(10, 1.6 + 0.55 * bars), layout="constrained")


def _png(fig) -> bytes:
    """A figure as reproducible PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _stage_parts(run: Run) -> list[float]:
    """Seconds per STAGE_PARTS entry; "other" is the rest of the steady time."""
    st = run.stages or Stages()
    unet = st.unet_total_s
    if unet is None and st.unet_step_s is not None:
        unet = st.unet_step_s * run.steps
    known = [st.text_encoder_s or 0.0, unet or 0.0, st.vae_decode_s or 0.0]
    return known + [max(run.steady_s - sum(known), 0.0)]


def _stage_chart(key: GroupKey, runs: list[Run]) -> bytes | None:
    """Stacked per-stage bars for the measured runs of one group."""
    runs = [run for run in runs if run.status == "ok" and run.steady_s is not None]
    if not runs:
        return None
    fig = _figure(len(runs))
    ax = fig.subplots()
    rows = range(len(runs))
    left = [0.0] * len(runs)
    for name, values in zip(STAGE_PARTS, zip(*map(_stage_parts, runs))):
        ax.barh(rows, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    _bar_axes(ax, [describe(run) for run in runs], "seconds (steady end-to-end)", group_title(key))
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def _bar_axes(ax, labels: list[str], xlabel: str, title: str) -> None:
    """Label a horizontal bar chart, first bar on top."""
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)


def _speedup_chart(results: Results) -> bytes | None:
    """Speed-up of every measured run over its machine's reference, coloured by backend."""
    refs = references(results)
    entries = [(key, run, speedup(run, reference_for(refs, run)))
               for key, runs in groups(results).items() for run in runs if not run.reference]
    entries = [entry for entry in entries if entry[2] is not None]
    if not entries:
        return None
    kinds = list(dict.fromkeys(f"{run.backend}/{run.provider}" for _, run, _ in entries))
    fig = _figure(len(entries))
    ax = fig.subplots()
    for i, (key, run, value) in enumerate(entries):
        kind = f"{run.backend}/{run.provider}"
        ax.barh(i, value, color=f"C{kinds.index(kind) % 10}", label=kind)
        ax.annotate(f"{value:.2f}x", (value, i), xytext=(3, 0), textcoords="offset points",
                    va="center")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, max(value for *_, value in entries) * 1.15)
    labels = [f"{group_slug(key)} | {describe(run)}" for key, run, _ in entries]
    _bar_axes(ax, labels, "speed-up vs same-machine diffusers-torch reference", "Speed-up")
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    ax.legend(handles.values(), handles.keys(), loc="best", fontsize="small")
    return _png(fig)


# ---- output -------------------------------------------------------------------------------


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
