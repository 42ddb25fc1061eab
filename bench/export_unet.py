"""Export the full-size SD 1.5 UNet (random weights) and check time and peak RSS against the targets."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGET_S, TARGET_RSS_GB = 180.0, 8.0
RESULT = Path(__file__).parent / "results" / "export_unet.json"


def unet_dims(batch: int = 1, size: int = 512) -> dict:
    """Concrete axis sizes of the SD 1.5 UNet export."""
    from sdexport.specs import dims

    from .models import SD15_TEXT, SD15_UNET, SD15_VAE

    configs = {"text_encoder": SD15_TEXT, "unet": SD15_UNET, "vae": SD15_VAE}
    return dims(configs, batch, size, size, sequence=77)


def export_child(dest: Path) -> dict:
    """Build the UNet and export it with sdexport's TorchScript path; returns build and export seconds."""
    from sdexport.export import export_component
    from sdexport.specs import UNET

    from .models import sd15_unet

    t0 = time.perf_counter()
    unet = sd15_unet()
    built = time.perf_counter()
    error = None
    try:
        export_component(UNET, unet, UNET.sample_inputs(unet_dims()), dest, opset=17)
    except Exception as exc:  # recorded in the result file: a failed export is a result too
        error = f"{type(exc).__name__}: {exc} (in {_where(exc)})"
    done = time.perf_counter()
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return {"build_s": built - t0, "export_s": done - built, "onnx_bytes": size, "error": error}


def _where(exc: BaseException) -> str:
    """module.function where an exception was raised."""
    import traceback

    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def measure(dest: Path) -> dict:
    """Run the export in a subprocess watched for peak RSS; the verdict against the targets."""
    from .watch import watch_json

    child, peak_mb, wall = watch_json("bench.export_unet", str(dest), "--result", what="export")
    peak_gb = peak_mb / 1024
    return child | {"wall_s": wall, "peak_rss_gb": peak_gb, "target_s": TARGET_S, "target_rss_gb": TARGET_RSS_GB,
                    "time_ok": child["export_s"] < TARGET_S and not child["error"],
                    "rss_ok": peak_gb < TARGET_RSS_GB, "load_avg_1m": os.getloadavg()[0],
                    "environment": _environment()}


def _environment() -> dict:
    """Machine facts for the result file."""
    from .__main__ import environment

    return environment("local").to_dict()


def main(argv=None) -> int:
    """Export, print the numbers against the targets, write bench/results/export_unet.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.export_unet", description=__doc__)
    parser.add_argument("--out", type=Path, help="keep the export here (default: a temporary folder)")
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(export_child(args.child)))
        return 0
    dest = args.out or Path(tempfile.mkdtemp(prefix="unet-export-"))
    try:
        report = measure(dest)
    finally:
        if args.out is None:
            shutil.rmtree(dest, ignore_errors=True)
    print(f"export {report['export_s']:.1f} s (target < {TARGET_S:.0f} s: {'ok' if report['time_ok'] else 'MISSED'}), "
          f"peak RSS {report['peak_rss_gb']:.2f} GB (target < {TARGET_RSS_GB:.0f} GB: "
          f"{'ok' if report['rss_ok'] else 'MISSED'}); build {report['build_s']:.1f} s, wall {report['wall_s']:.1f} s")
    if report["error"]:
        print(f"export FAILED: {report['error']}")
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
