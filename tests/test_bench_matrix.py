"""bench.matrix on the tiny model: every cell is measured or says why not, and the runtimes match torch fp32."""
from __future__ import annotations

import json
import shutil

import pytest

from bench import matrix

pytest.importorskip("openvino", reason='openvino is not installed (pip install "sdexport[openvino]")')


@pytest.fixture(scope="module")
def doc(tiny_folder, tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    cpu = shutil.copytree(tiny_export[0], out / "tiny-cpu")        # OpenVINO writes its cache into the folder
    assert matrix.main(["--source", str(tiny_folder), "--cpu-folder", str(cpu), "--components",
                        "vae_decoder", "text_encoder", "--repeats", "1", "--work", str(out / "work"),
                        "--out", str(out)]) == 0
    return json.loads((out / "matrix.json").read_text()) | {"md": (out / "matrix.md").read_text()}


def _cell(doc, component, engine, precision):
    return next(c for c in doc["cells"] if (c["component"], c["engine"], c["precision"]) ==
                (component, engine, precision))


def test_fp32_runtimes_match_torch(doc):
    for component in ("vae_decoder", "text_encoder"):
        assert _cell(doc, component, "torch", "fp32")["vs_torch_fp32"] == 1.0
        for engine in ("onnxruntime", "openvino"):
            cell = _cell(doc, component, engine, "fp32")
            assert cell["call_s"] > 0 and cell["peak_rss_gb"] > 0
            assert cell["diff_vs_torch_fp32"]["max_abs"] < 1e-4, (component, engine)
    assert _cell(doc, "vae_decoder", "openvino", "fp32")["ran_as"] == "f32"


def test_int8_text_encoder_is_built_and_compared(doc):
    cell = _cell(doc, "text_encoder", "onnxruntime", "int8 dynamic (MatMul)")
    assert 0 < cell["diff_vs_torch_fp32"]["max_abs"] < 1.0


def test_cells_that_cannot_run_say_why(doc):
    assert "no bf16 kernels" in _cell(doc, "vae_decoder", "onnxruntime", "bf16")["skipped"]
    assert "no CPU int8 path" in _cell(doc, "text_encoder", "torch", "int8")["skipped"]
    rows = [line for line in doc["md"].splitlines() if line.startswith("| vae_decoder")]
    assert len(rows) == 9 and "flags" in doc["md"]
