"""`sdexport convert`: load, export every component, optimise for the target, verify, write one folder."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.atomic import check_writable_parent, staged_dir
from runtime.errors import UserError
from runtime.manifest import MANIFEST_NAME, GraphInfo, Manifest, file_record, manifest_from_dict, read_manifest

from . import __version__
from .controlnet import attach_controlnets, manifest_entries, recorded_sources
from .export import export_component
from .optimize import optimize_component
from .profiles import Profile, graph_provider_options
from .quantize import apply_static_int8, int8_settings
from .sources import Components, load_components, present, resolve
from .specs import component_specs, dims, manifest_io
from .structure import check_structure, fp16_range_check
from .verify import Check, not_run, verify_graph
from .weight_map import LORA_TYPES, WEIGHT_MAP, write_weight_map

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
    license: str | None = None                        # --license: overrides what the source declares
    controlnets: tuple = ()                           # --controlnet values, in order: controlnet, controlnet_1, ...


@dataclass
class ConvertReport:
    """What a convert produced and how well it matched PyTorch."""
    out: Path
    checks: list = field(default_factory=list)
    license: str = "unknown"

    @property
    def ok(self) -> bool:
        """Every graph that ran is within tolerance."""
        return all(c.ok for c in self.checks if c.ran)


def _no_progress(_: str) -> None:
    """Default progress callback: silent."""


def convert(cfg: ConvertConfig, progress: Progress = _no_progress) -> ConvertReport:
    """Run the whole export into a staging folder that becomes cfg.out only when everything passed."""
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    check_writable_parent(out)
    progress("loading model")
    components = attach_controlnets(load_components(resolve(cfg.model, cfg.license), cfg.overrides), cfg.controlnets)
    with staged_dir(out, replace_existing=cfg.force) as tmp:
        report = ConvertReport(out, license=components.source.license)
        graphs = {}
        for spec in component_specs(components.configs):
            progress(f"exporting {spec.name}")
            graphs[spec.name] = _export_one(spec, components, tmp, cfg.profile)
            report.checks += _verify(spec, components, tmp, cfg, "traced", "fp32", progress)
            progress(f"optimising {spec.name} for {cfg.profile.name}")
            graphs[spec.name] |= optimize_component(tmp / spec.name / "model.onnx", spec, cfg.profile)
            if spec.model_type in LORA_TYPES:            # LoRA targets: record where each weight went
                write_weight_map(tmp / spec.name, components.module(spec), spec.model_type)
                graphs[spec.name]["weight_map"] = f"{spec.name}/{WEIGHT_MAP}"
            report.checks += _verify(spec, components, tmp, cfg, "optimised", graphs[spec.name]["precision"],
                                     progress)
        failed = [c for c in report.checks if c.ran and not c.ok]
        if failed:
            raise UserError("verification failed: " + "; ".join(c.describe() for c in failed))
        _copy_side_files(components, tmp)
        if int8_settings(cfg.profile).mode == "static":       # calibrated on pipeline runs of the whole folder
            apply_static_int8(tmp, components, cfg.profile, graphs, report.checks, progress)
        write_manifest(tmp, components, cfg.profile, graphs, report.checks)
    return report


def _verify(spec, components: Components, folder: Path, cfg: ConvertConfig, stage: str, precision: str,
            progress) -> list:
    """Compare a graph to PyTorch on the CPU; graphs that need GPU kernels get structural checks instead."""
    if not cfg.verify:
        return []
    progress(f"verifying {spec.name} ({stage})")
    graph = folder / spec.name / "model.onnx"
    checks = verify_graph(spec, components.module(spec), graph, components.configs, precision, stage)
    if stage == "traced" and cfg.profile.component_precision(spec.name) == "fp16":
        checks.append(fp16_range_check(spec, graph, components.configs, cfg.profile.fp32_ops))
    if stage == "optimised":
        problems = check_structure(graph, precision == "fp16")
        if problems:
            raise UserError("optimised graph failed structural checks: " + "; ".join(problems))
    return checks


def _export_one(spec, components: Components, folder: Path, profile: Profile) -> dict:
    """Export one component and describe it for the manifest."""
    d = dims(components.configs, *spec.sample_cases(components.configs)[0])
    dest = folder / spec.name
    export_component(spec, components.module(spec), spec.sample_inputs(d), dest, profile.opset)
    (dest / "config.json").write_text(json.dumps(components.configs[spec.module], indent=2))
    data = dest / "model.onnx_data"
    return {"file": f"{spec.name}/model.onnx", "data_file": f"{spec.name}/model.onnx_data" if data.exists() else None,
            **manifest_io(spec, d), "precision": "fp32", "provider": profile.provider, "custom_ops": [],
            "provider_options": graph_provider_options(profile, spec, components.configs)}


def _copy_side_files(components: Components, folder: Path) -> None:
    """Tokenizer folders of the exported text encoders, scheduler/, and an Optimum-style model_index.json."""
    src = components.source.folder
    for spec in component_specs(components.configs):
        if spec.tokenizer and (src / spec.tokenizer).is_dir() and present(components.model_index, spec.tokenizer):
            shutil.copytree(src / spec.tokenizer, folder / spec.tokenizer)
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
    """sdexport.json: source, licence, target, profile, shapes, graphs, hashes of every file, versions."""
    files = {p.relative_to(folder).as_posix(): file_record(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = Manifest(
        target=profile.name, precision=profile.precision, license=components.source.license,
        shape_ranges={axis: r.as_list() for axis, r in profile.shapes.items()},
        graphs={name: GraphInfo.from_dict(name, g) for name, g in graphs.items()}, files=files,
        source=components.source.to_dict() | {"overrides": components.overrides,
                                               "controlnets": manifest_entries(components)},
        profile={"name": profile.name, "file": profile.source, "hash": profile.hash},
        session=profile.session | {"fallback_providers": list(profile.fallback_providers),
                                   "io_binding": profile.io_binding, "cuda_graph": profile.cuda_graph,
                                   "free_dimension_overrides": profile.free_dimension_overrides},
        provider_options=profile.provider_options, tool_versions=tool_versions(),
        verification={"checks": [c.to_dict() for c in checks]}, sdexport_version=__version__)
    data = manifest.to_dict()
    manifest_from_dict(data)                     # what we write must validate
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def verify_folder(folder: Path, model: str, progress: Progress = _no_progress, overrides: dict | None = None
                  ) -> list[Check]:
    """`sdexport verify`: re-run the PyTorch comparison on every graph of an existing export, by convert's rule."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST_NAME}; not a folder written by sdexport convert")
    progress("loading model")
    components = attach_controlnets(load_components(resolve(model), overrides), recorded_sources(manifest.source))
    specs = {s.name: s for s in component_specs(components.configs)}
    fallbacks = tuple(manifest.session.get("fallback_providers", ()))
    checks = []
    for name, info in manifest.graphs.items():
        if name not in specs:
            checks.append(not_run(name, "shipped", f"model {model!r} has no {name} to compare with"))
            continue
        progress(f"verifying {name}")
        providers = tuple(dict.fromkeys((info.provider, *fallbacks, "CPUExecutionProvider")))
        checks += verify_graph(specs[name], components.module(specs[name]), Path(folder) / info.file,
                               components.configs, info.precision, "shipped", providers)
    checks += [not_run(n, "shipped", "not in this folder's manifest") for n in specs if n not in manifest.graphs]
    return checks
