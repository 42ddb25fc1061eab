"""The CPU a benchmark ran on: model name and the SIMD/matrix flags that decide fp32/bf16/int8 speed."""
from __future__ import annotations

import platform
from pathlib import Path

# flags that change which kernels run: AVX2/FMA (fp32), AVX-512, VNNI (int8), BF16 and AMX (bf16/int8 tiles)
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
         "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """{"model", "flags" (those of FLAGS the CPU has), "openvino" (its CPU capabilities, if installed)}."""
    model, flags = platform.processor() or None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "openvino": _openvino_capabilities()}


def _openvino_capabilities() -> list | None:
    """OpenVINO's OPTIMIZATION_CAPABILITIES for the CPU (e.g. FP32, BF16, INT8), or None without openvino."""
    try:
        import openvino
    except ImportError:
        return None
    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def describe(info: dict) -> str:
    """One line: model, flags, native bf16 or not."""
    bf16 = any(f in info["flags"] for f in ("avx512_bf16", "amx_bf16"))
    return (f"{info['model']}; flags {' '.join(info['flags']) or 'none of ' + ', '.join(FLAGS)}; "
            f"bf16 {'native' if bf16 else 'not native (fp32 kernels)'}")
