"""`sdexport convert`: load, export every component, optimise for the target, verify, write one folder."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.atomic import check_writable_parent, staged_dir
from runtime.errors import UserError
from runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, file_record, read_manifest

from . import __version__
from .export import export_component, sample_inputs
from .profiles import Profile
from .sources import Components, load_components, present, resolve
from .specs import component_specs, dims, manifest_shape
from .optimize import optimize_component
from .verify import Check, check_structure, fp16_range_check, verify_graph, verify_shapes

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ConvertConfig:
    """What one convert does."""
    model: str
    profile: Profile
    out: Path
    force: bool = False
    verify: bool = True
    overrides: dict = field(default_factory=dict)    # component -> folder (--vae, --text-encoder)


@dataclass
class ConvertReport:
    """What a convert produced and how well it matched PyTorch."""
    out: Path
    checks: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """All checks within tolerance."""
        return all(c.ok for c in self.checks)


def _no_progress(_: str) -> None:
    """Default progress callback: silent."""


def convert(cfg: ConvertConfig, progress: Progress = _no_progress) -> ConvertReport:
    """Run the whole export into a staging folder that becomes cfg.out only when everything passed."""
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    check_writable_parent(out)
    progress("loading model")
    components = load_components(resolve(cfg.model), cfg.overrides)
    with staged_dir(out, replace_existing=cfg.force) as tmp:
        report = ConvertReport(out)
        graphs = {}
        for spec in component_specs(components.configs):
            progress(f"exporting {spec.name}")
            graphs[spec.name] = _export_one(spec, components, tmp, cfg.profile)
            report.checks += _verify(spec, components, tmp, cfg, "traced", progress)
            progress(f"optimising {spec.name} for {cfg.profile.name}")
            graphs[spec.name] |= optimize_component(tmp / spec.name / "model.onnx", spec, cfg.profile)
            report.checks += _verify(spec, components, tmp, cfg, "optimised", progress)
        failed = [c for c in report.checks if not c.ok]
        if failed:
            raise UserError("verification failed: " + "; ".join(
                f"{c.component} {c.shape} ({c.stage}) max abs error {c.max_abs:.3g} > {c.limit:.3g}"
                + (f", PSNR {c.psnr_db} dB < {c.min_psnr_db}" if c.min_psnr_db else "") for c in failed))
        _copy_side_files(components, tmp)
        write_manifest(tmp, components, cfg.profile, graphs, report.checks)
    return report


def _verify(spec, components: Components, folder: Path, cfg: ConvertConfig, stage: str, progress) -> list:
    """Compare a graph to PyTorch on the CPU; graphs that need GPU kernels get structural checks instead."""
    if not cfg.verify:
        return []
    progress(f"verifying {spec.name} ({stage})")
    graph = folder / spec.name / "model.onnx"
    fp16 = cfg.profile.component_precision(spec.name) == "fp16"
    checks = verify_graph(spec, _module(spec, components), graph, components.configs, stage=stage, fp16=fp16)
    if stage == "traced" and fp16:
        checks.append(fp16_range_check(spec, graph, components.configs, cfg.profile.fp32_ops))
    if stage == "optimised":
        problems = check_structure(graph, fp16)
        if problems:
            raise UserError("optimised graph failed structural checks: " + "; ".join(problems))
    return checks


def _module(spec, components: Components):
    """The loaded torch module a spec wraps."""
    return getattr(components, spec.module)


def _export_one(spec, components: Components, folder: Path, profile: Profile) -> dict:
    """Export one component and describe it for the manifest."""
    d = dims(components.configs, *verify_shapes(components.configs)[0], sequence=77)
    dest = folder / spec.name
    export_component(spec, _module(spec, components), sample_inputs(spec, d), dest, profile.opset)
    (dest / "config.json").write_text(json.dumps(components.configs[spec.module], indent=2))
    data = dest / "model.onnx_data"
    return {
        "file": f"{spec.name}/model.onnx", "data_file": f"{spec.name}/model.onnx_data" if data.exists() else None,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": manifest_shape(t, d)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": manifest_shape(t, d)} for t in spec.outputs],
        "precision": "fp32", "provider": profile.provider, "custom_ops": [],
    }


def _copy_side_files(components: Components, folder: Path) -> None:
    """tokenizer/, scheduler/ and an Optimum-style model_index.json."""
    src = components.source.folder
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (src / tokenizer).is_dir() and present(components.model_index, tokenizer):
            shutil.copytree(src / tokenizer, folder / tokenizer)
    (folder / "scheduler").mkdir()
    shutil.copyfile(src / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    index = dict(components.model_index)
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in index:
            index[optional] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def tool_versions() -> dict:
    """Versions of the libraries that shaped the export."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"sdexport": __version__}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_manifest(folder: Path, components: Components, profile: Profile, graphs: dict, checks: list) -> None:
    """sdexport.json: source, target, profile, shapes, graphs, hashes of every file, versions."""
    files = {p.relative_to(folder).as_posix(): file_record(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {
        "format_version": FORMAT_VERSION, "sdexport_version": __version__,
        "source": components.source.to_dict() | {"overrides": components.overrides}, "target": profile.name, "precision": profile.precision,
        "profile": {"name": profile.name, "file": profile.source, "hash": profile.hash},
        "shape_ranges": {axis: r.as_list() for axis, r in profile.shapes.items()},
        "graphs": graphs, "files": files,
        "session": profile.session | {"fallback_providers": list(profile.fallback_providers),
                                      "io_binding": profile.io_binding, "cuda_graph": profile.cuda_graph,
                                      "free_dimension_overrides": profile.free_dimension_overrides}, "provider_options": profile.provider_options,
        "tool_versions": tool_versions(), "verification": {"checks": [c.to_dict() for c in checks]},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    read_manifest(folder)   # what we write must validate


def verify_folder(folder: Path, model: str, progress: Progress = _no_progress, overrides: dict | None = None
                  ) -> list[Check]:
    """`sdexport verify`: re-run the PyTorch comparison on an existing export."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST_NAME}; not a folder written by sdexport convert")
    progress("loading model")
    components = load_components(resolve(model), overrides)
    checks = []
    for spec in component_specs(components.configs):
        if spec.name in manifest.graphs:
            progress(f"verifying {spec.name}")
            checks += verify_graph(spec, _module(spec, components), Path(folder) / manifest.graphs[spec.name].file,
                                   components.configs)
    return checks
