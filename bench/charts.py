"""The report's PNG charts: stage breakdown per group and speed-ups, rendered in memory."""
from __future__ import annotations

import io

from bench.grouping import GroupKey, chart_name, describe, group_slug, group_title, groups, reference_for, references, speedup
from bench.schema import Results, Run, Stages

STAGE_PARTS = ("text encoder", "UNet total", "VAE decode", "other")
SPEEDUP_CHART = "speedup.png"


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
