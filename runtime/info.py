"""Human-readable description of an exported model folder."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelFolderError
from .manifest import Manifest, edited_configs, read_manifest


def describe_folder(folder: Path) -> str:
    """The manifest of `folder` in human form (or what can be inferred without one)."""
    if not Path(folder).is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    manifest = read_manifest(folder)
    if manifest is None:
        graphs = sorted(p.parent.name for p in Path(folder).glob("*/model.onnx"))
        if not graphs:
            raise ModelFolderError(f"{folder}: not an exported model folder (no sdexport.json, no */model.onnx)")
        return f"{folder}: folder without sdexport.json (e.g. Optimum's exporter); graphs: {', '.join(graphs)}"
    return describe_manifest(folder, manifest)


def describe_manifest(folder: Path, m: Manifest) -> str:
    """Lines: source, licence, target, precision, shapes, each graph's I/O, edited configs, versions."""
    src = m.source
    lines = [f"{folder}", f"  source      {src.get('spec')} ({src.get('kind')}"
             + (f", {src['repo_id']}" if src.get("repo_id") else "") + ")",
             f"  license     {m.license}",
             f"  target      {m.target} (profile {m.profile.get('name')}, sha256 {m.profile.get('hash', '')[:12]})",
             f"  precision   {m.precision}"]
    lines += [f"  {axis:<11} {lo} .. {hi} (opt {opt})" for axis, (lo, opt, hi) in m.shape_ranges.items()]
    for g in m.graphs.values():
        size = sum(rec["size"] for rel, rec in m.files.items() if rel.startswith(g.name + "/model.onnx"))
        lines.append(f"  {g.name:<13} {g.file} ({size / 2**20:.1f} MiB, {g.precision}, {g.provider}"
                     + (f", custom ops {', '.join(g.custom_ops)}" if g.custom_ops else "") + ")")
        for kind, tensors in (("in ", g.inputs), ("out", g.outputs)):
            for t in tensors:
                lines.append(f"      {kind} {t.name:<24} {t.dtype:<8} [{', '.join(map(str, t.shape))}]")
    checks = m.verification.get("checks", [])
    if checks:
        worst = max(checks, key=lambda c: c["max_abs"])
        lines.append(f"  verified    {len(checks)} checks, worst {worst['component']} {worst['max_abs']:.2e}")
    lines += [f"  edited      {rel} (edited since export)" for rel in edited_configs(folder, m)]
    lines.append("  versions    " + ", ".join(f"{k} {v}" for k, v in m.tool_versions.items() if v))
    return "\n".join(lines)
