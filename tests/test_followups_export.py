"""The exporter as a user checks it: verify never passes graphs it did not run, licences travel with the
weights, profile typos are refused, and one spec describes each component."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from runtime.manifest import read_manifest
from sdexport.cli import main
from sdexport.profiles import PROFILE_DIR, load_profile


def run(*args):
    """Invoke the sdexport CLI in-process."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def error_line(result) -> str:
    """The single error line of a failed command (progress lines start with '[')."""
    lines = [l for l in result.stderr.strip().splitlines() if not l.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- verify is honest -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_export(tiny_targets):
    """The tiny model exported for the cuda target (its fused graphs need CUDA kernels)."""
    return tiny_targets("cuda")


def test_verify_fails_and_names_graphs_it_could_not_run(cuda_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine can run cuda graphs")
    r = run("verify", str(cuda_export), "--model", "tiny")
    assert r.exit_code == 2, r.output
    assert "match PyTorch" not in r.stdout
    line = error_line(r)
    for graph in ("unet", "vae_decoder", "vae_encoder"):      # GroupNorm/NhwcConv have no CPU kernels
        assert f"{graph} (shipped) not run" in line, line
    assert "CUDAExecutionProvider" in r.stdout or "contrib ops" in line


def test_verify_judges_by_the_manifest_precision(cuda_export, tiny_components):
    """An fp16 graph that does run here is judged by PSNR, as convert judges it, not by fp32's max abs limit."""
    from sdexport.convert import verify_folder

    checks = verify_folder(cuda_export, "tiny")
    manifest = read_manifest(cuda_export)
    for c in checks:
        if c.ran:
            assert manifest.graphs[c.component].precision == "fp16"
            assert c.min_psnr_db is not None, c
    assert {c.component for c in checks} == set(manifest.graphs)


def test_verify_passes_a_cpu_export(tiny_export):
    r = run("verify", str(tiny_export[0]), "--model", "tiny")
    assert r.exit_code == 0 and "all 8 checks of 4 graphs match PyTorch" in r.stdout, r.output


# -- licences ---------------------------------------------------------------------------------------------------

CARD = """---
license: other
license_name: sai-nc-community
tags:
- text-to-image
---
# A model
"""


def test_licence_from_model_card_alias_and_option(tiny_folder, tmp_path):
    from sdexport.licence import card_licence
    from sdexport.sources import aliases, resolve

    assert card_licence(CARD) == "sai-nc-community"
    assert card_licence("---\nlicense: creativeml-openrail-m\n---\n") == "creativeml-openrail-m"
    assert card_licence("# no front matter\nlicense: mit\n") == "unknown"
    assert aliases()["sd-v1-5"]["license"] == "creativeml-openrail-m"
    assert aliases()["sdxl-turbo"]["license"] == "sai-nc-community"
    src = tmp_path / "model"
    shutil.copytree(tiny_folder, src)
    assert resolve(str(src)).license == "unknown"
    (src / "README.md").write_text(CARD)
    assert resolve(str(src)).license == "sai-nc-community"
    assert resolve(str(src), license="my-licence").license == "my-licence"


def test_licence_is_recorded_and_shown(tiny_folder, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_folder, src)
    (src / "README.md").write_text(CARD.replace("other", "openrail++").replace("license_name: sai-nc-community\n", ""))
    out = tmp_path / "out"
    r = run("convert", "--model", str(src), "--out", str(out), "--no-verify", "--quiet")
    assert r.exit_code == 0, r.output
    assert "licence openrail++" in r.stdout
    assert json.loads((out / "sdexport.json").read_text())["license"] == "openrail++"
    info = run("info", str(out))
    assert any(l.split() == ["license", "openrail++"] for l in info.stdout.splitlines()), info.stdout


# -- profiles: target facts as validated data -------------------------------------------------------------------

@pytest.mark.parametrize("section,line,words", [
    ("[session]", 'graph_optimisation_level = "all"', ("session.graph_optimisation_level", "not a session setting")),
    ('execution_mode = "sequential"', 'execution_mode = "fast"', ("session.execution_mode", "sequential")),
    ("[session]", "enable_mem_pattern = 1", ("session.enable_mem_pattern", "bool")),
    ("[provider_options]", 'cudnn_conv_algo_serch = "EXHAUSTIVE"', ("provider_options.cudnn_conv_algo_serch",)),
])
def test_profile_typos_are_refused(tmp_path, section, line, words):
    from runtime.errors import UserError

    text = (PROFILE_DIR / "cuda.toml").read_text()
    assert section in text
    text = text.replace(section, line if "=" in section else f"{section}\n{line}", 1)
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_profile(str(path))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_preoptimize_only_for_the_cpu_provider(tmp_path):
    from runtime.errors import UserError

    text = (PROFILE_DIR / "cuda.toml").read_text().replace("[shapes]", 'preoptimize = "extended"\n\n[shapes]', 1)
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UserError, match="preoptimize.*CPUExecutionProvider"):
        load_profile(str(path))
    assert load_profile("cpu").preoptimize == "extended"
    assert {load_profile(t).preoptimize for t in ("cuda", "tensorrt", "directml")} == {"disabled"}


# -- one spec per component -------------------------------------------------------------------------------------

def test_every_component_table_derives_from_the_specs(tiny_components):
    from sdexport.profiles import COMPONENT_NAMES as profile_components
    from sdexport.specs import BASE, component_specs, source_classes

    assert profile_components == tuple(s.name for s in BASE)
    assert "text_encoder_2" in profile_components
    specs = component_specs(tiny_components.configs)
    assert [s.name for s in specs] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert set(tiny_components.modules) == {s.module for s in specs} <= set(source_classes())
    assert {s.name: s.tokenizer for s in specs}["text_encoder"] == "tokenizer"
    assert {s.model_type for s in specs} == {"clip", "unet", "vae"}
