"""Benchmark result schema, version 1: frozen dataclasses with validation."""

from __future__ import annotations

import json

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_file

SCHEMA_VERSION = 1
BACKENDS = ("diffusers-torch", "runtime-ort", "runtime-openvino", "diffusers-torch-bf16")
PROVIDERS = ("cpu", "cuda", "tensorrt", "directml", "openvino")
STATUSES = ("ok", "skipped", "failed")
REFERENCE_BACKEND = "diffusers-torch"
_RUN_NUMBERS = ("session_create_s", "first_run_s", "steady_s", "peak_rss_mb", "gpu_mem_mb")

from bench.fields import Fields, SchemaError, number_fields  # noqa: F401  (SchemaError: part of this API)

@dataclass(frozen=True, kw_only=True)
class Stages:
    """Per-stage timings in seconds."""

    text_encoder_s: float | None = None
    unet_step_s: float | None = None
    unet_total_s: float | None = None
    scheduler_overhead_s: float | None = None
    vae_decode_s: float | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "stages") -> Stages:
        """Validate and build from JSON data; missing stages are null."""
        return number_fields(cls, data, path, required=False)

@dataclass(frozen=True, kw_only=True)
class ImageDiff:
    """Difference of a run's image from the reference image."""

    max_abs: float
    psnr_db: float

    @classmethod
    def from_dict(cls, data: Any, path: str = "image_diff") -> ImageDiff:
        """Validate and build from JSON data; psnr_db may be infinite."""
        return number_fields(cls, data, path, required=True, allow_inf=("psnr_db",))

@dataclass(frozen=True, kw_only=True)
class Environment:
    """The machine and software a set of runs was measured on."""

    machine_id: str
    cpu: str | None = None
    cores: int | None = None
    ram_gb: float | None = None
    gpu: str | None = None
    os: str | None = None
    python: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str = "environment") -> Environment:
        """Validate and build from JSON data."""
        f = Fields(data, path)
        texts = {name: f.text(name) for name in ("cpu", "gpu", "os", "python")}
        env = cls(machine_id=f.text("machine_id", True), cores=f.integer("cores"),
                  ram_gb=f.number("ram_gb"), versions=_versions(f.child("versions")), **texts)
        f.done()
        return env

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

def _versions(f: Fields | None) -> dict[str, str | None]:
    """Package name -> version string (or null)."""
    return {} if f is None else {name: f.text(name) for name in f.data}

@dataclass(frozen=True, kw_only=True)
class Run:
    """One measured (or skipped/failed) backend configuration."""

    machine_id: str
    backend: str
    provider: str | None = None
    profile: str | None = None
    profile_hash: str | None = None
    variant: str | None = None
    model: str
    width: int
    height: int
    steps: int
    batch: int
    reference: bool
    status: str
    reason: str | None = None
    session_create_s: float | None = None
    first_run_s: float | None = None
    steady_s: float | None = None
    stages: Stages | None = None
    peak_rss_mb: float | None = None
    gpu_mem_mb: float | None = None
    image_diff: ImageDiff | None = None

    @property
    def group(self) -> tuple[str, int, int, int, int]:
        """(model, width, height, steps, batch): runs that are comparable."""
        return (self.model, self.width, self.height, self.steps, self.batch)

    @classmethod
    def from_dict(cls, data: Any, path: str = "run", machine_id: str | None = None) -> Run:
        """Validate and build from JSON data; machine_id defaults to the file's machine."""
        f = Fields(data, path)
        values = {name: f.text(name) for name in ("profile", "profile_hash", "variant", "reason")}
        values |= {name: f.integer(name, True) for name in ("width", "height", "steps", "batch")}
        values |= {name: f.number(name) for name in _RUN_NUMBERS}
        run = cls(machine_id=_machine(f, machine_id), backend=f.text("backend", True, BACKENDS),
                  provider=f.text("provider", choices=PROVIDERS), model=f.text("model", True),
                  reference=f.flag("reference"), status=f.text("status", True, STATUSES),
                  stages=_nested(Stages, f, "stages"),
                  image_diff=_nested(ImageDiff, f, "image_diff"), **values)
        f.done()
        _check_run(run, f)
        return run

    def to_dict(self, with_machine: bool = True) -> dict:
        """JSON-ready dict; machine_id is left out for single-machine documents."""
        data = asdict(self)
        if not with_machine:
            del data["machine_id"]
        return data

def _machine(f: Fields, default: str | None) -> str:
    """A run's machine_id: its own field, or the document's single machine."""
    own = f.text("machine_id", required=default is None)
    if default is not None and own is not None and own != default:
        f.fail("machine_id", f"{own!r} differs from environment.machine_id {default!r}")
    return own or default

def _nested(cls, f: Fields, name: str):
    """An optional nested dataclass field."""
    value = f.get(name)
    return None if value is None else cls.from_dict(value, f.at(name))

def _check_run(run: Run, f: Fields) -> None:
    """Rules that span several fields of one run."""
    if run.status != "ok" and not run.reason:
        f.fail("reason", f"required when status is {run.status!r}")
    if run.reference and run.backend != REFERENCE_BACKEND:
        f.fail("reference", f"only a {REFERENCE_BACKEND} run can be the reference")
    if run.reference and run.image_diff is not None:
        f.fail("image_diff", "must be null for the reference run")

@dataclass(frozen=True, kw_only=True)
class Results:
    """A result document: runs from one or more machines."""

    schema_version: int = SCHEMA_VERSION
    created: str
    preset: str
    environments: tuple[Environment, ...]
    runs: tuple[Run, ...]

    def __post_init__(self):
        _check_machines(self)
        _check_references(self.runs)

    @property
    def machines(self) -> tuple[str, ...]:
        """Machine ids in document order."""
        return tuple(env.machine_id for env in self.environments)

    @classmethod
    def from_dict(cls, data: Any) -> Results:
        """Validate and build from a parsed JSON document."""
        f = Fields(data, "")
        version = f.get("schema_version", required=True)
        if type(version) is not int or version != SCHEMA_VERSION:
            f.fail("schema_version", f"unsupported version {version!r} (expected {SCHEMA_VERSION})")
        created, preset = _created(f), f.text("preset", True)
        envs = _environments(f)
        single = envs[0].machine_id if "environment" in data else None
        runs = tuple(Run.from_dict(item, path, single) for path, item in f.items("runs"))
        f.done()
        return cls(schema_version=version, created=created, preset=preset, environments=envs,
                   runs=runs)

    def to_dict(self) -> dict:
        """JSON-ready dict: "environment" for one machine, "environments" for several."""
        single = len(self.environments) == 1
        data = {"schema_version": self.schema_version, "created": self.created,
                "preset": self.preset}
        if single:
            data["environment"] = self.environments[0].to_dict()
        else:
            data["environments"] = [env.to_dict() for env in self.environments]
        data["runs"] = [run.to_dict(with_machine=not single) for run in self.runs]
        return data

def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 time (a trailing Z allowed)."""
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)

def _created(f: Fields) -> str:
    """The document's ISO-8601 creation time."""
    text = f.text("created", True)
    try:
        parse_time(text)
    except ValueError:
        f.fail("created", f"expected an ISO-8601 time, got {text!r}")
    return text

def _environments(f: Fields) -> tuple[Environment, ...]:
    """The single "environment" or the merged "environments" list."""
    if "environments" not in f.data:
        return (Environment.from_dict(f.get("environment", True), f.at("environment")),)
    if "environment" in f.data:
        f.fail("environment", 'give either "environment" or "environments", not both')
    envs = tuple(Environment.from_dict(item, path) for path, item in f.items("environments"))
    if not envs:
        f.fail("environments", "at least one environment is required")
    return envs

def _check_machines(results: Results) -> None:
    """Machine ids are unique and every run names a known machine."""
    known: set[str] = set()
    for i, env in enumerate(results.environments):
        if env.machine_id in known:
            raise SchemaError(f"environments[{i}].machine_id: duplicate machine {env.machine_id!r}")
        known.add(env.machine_id)
    for i, run in enumerate(results.runs):
        if run.machine_id not in known:
            raise SchemaError(f"runs[{i}].machine_id: unknown machine {run.machine_id!r}")

def _check_references(runs: tuple[Run, ...]) -> None:
    """At most one reference run per machine and group."""
    first: dict[tuple, int] = {}
    for i, run in enumerate(runs):
        key = (run.machine_id, *run.group)
        if run.reference and first.setdefault(key, i) != i:
            raise SchemaError(f"runs[{i}].reference: a second reference for {key} "
                              f"(the first is runs[{first[key]}])")

def dumps(results: Results) -> str:
    """Serialise to JSON text (an infinite psnr_db is written as Infinity)."""
    return json.dumps(results.to_dict(), indent=2) + "\n"

def read_json(path: str | os.PathLike) -> Results:
    """Load and validate one result file; errors start with the file name."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: invalid JSON: {exc}") from None
    try:
        return Results.from_dict(data)
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from None

def write_json(results: Results, path: str | os.PathLike) -> Path:
    """Write a result file atomically: it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out:
        out.write(dumps(results).encode("utf-8"))
    return path
