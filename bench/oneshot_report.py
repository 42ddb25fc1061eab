"""The one-shot table: fixed cost and peak RSS per variant, ratios against diffusers, image differences."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("onnxruntime", "openvino", "torch", "diffusers", "numpy")


def _versions() -> dict:
    """Library versions of this run."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _image_diffs(runs: list) -> None:
    """Max abs and PSNR of each image against the diffusers one (when both exist), added to the runs."""
    import numpy as np

    from runtime.metrics import max_abs, psnr

    ref = next((r for r in runs if r["name"].startswith("diffusers") and r["status"] == "ok"), None)
    for r in runs:
        if ref is not None and r is not ref and r["status"] == "ok":
            a, b = np.load(ref["image"]), np.load(r["image"])
            r["vs_diffusers"] = {"max_abs": max_abs(a, b), "psnr_db": psnr(a, b, peak=1.0)}
    for r in runs:                       # the images lived in a temporary folder: not part of the record
        r.pop("image", None)


def _row(r: dict, ref: dict | None) -> str:
    """One Markdown row."""
    if r["status"] != "ok":
        return f"| {r['name']} | failed: {r['reason']} |" + " |" * 7
    fixed = r["import_s"] + r["open_s"] + sum(r.get("session_create_s", {}).values())
    ratio = f" ({ref['process_s'] / r['process_s']:.2f}x)" if ref else ""
    mem = f" ({r['peak_mb'] / ref['peak_mb']:.2f}x)" if ref else ""
    diff = f"{r['vs_diffusers']['max_abs']:.1e}" if r.get("vs_diffusers") else "-"
    return (f"| {r['name']} | {r['process_s']:.1f}{ratio} | {r['import_s']:.1f} | {r['open_s']:.1f} | "
            f"{sum(r.get('session_create_s', {}).values()):.1f} | {fixed:.1f} | {r['decode_s']:.1f} | "
            f"{r['peak_denoise_mb'] / 1024:.2f} / {r['peak_mb'] / 1024:.2f}{mem} | "
            f"{diff} |")


def report(runs: list, cpu: dict, args) -> dict:
    """The result JSON: runs, CPU, versions and the Markdown table."""
    _image_diffs(runs)
    ref = next((r for r in runs if r["name"].startswith("diffusers") and r["status"] == "ok"), None)
    head = ("| variant | process s (vs diffusers) | import s | open s | session creation s | fixed cost s | "
            "VAE decode s | peak RSS GB: to end of denoising / whole run (vs diffusers) | "
            "image max abs vs diffusers |\n"
            "|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([head] + [_row(r, ref) for r in runs])
    return {"size": args.size, "steps": args.steps, "cpu": cpu, "versions": _versions(), "runs": runs, "table": table}
