"""Benchmark results as a report sees them: merged across machines, grouped, compared with the reference."""
from __future__ import annotations

import os
import re
from datetime import timezone
from typing import Iterable

from bench.schema import Results, Run, parse_time, read_json

GroupKey = tuple  # (model, width, height, steps, batch)


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




def group_slug(key: GroupKey) -> str:
    """Short file-name-safe id of a group."""
    model, width, height, steps, batch = key
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{width}x{height}-{steps}steps-b{batch}")


def chart_name(key: GroupKey) -> str:
    """File name of a group's stage chart."""
    return f"stages-{group_slug(key)}.png"
