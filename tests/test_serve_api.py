"""`runtime serve` used over HTTP as A1111 / OpenAI clients use it, on the tiny model: same images as the CLI."""
from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.cli import main
from runtime.schedulers import a1111_samplers, a1111_schedulers
from runtime.serve.settings import ServeSettings
from serve_util import Served, decode_png, png_b64, wait_for

BASE = {"prompt": "a (red:1.2) lighthouse BREAK at dusk", "negative_prompt": "blurry", "steps": 4, "cfg_scale": 6.5,
        "width": 64, "height": 64, "sampler_name": "Euler a", "seed": 123}


@pytest.fixture(scope="module")
def models_dir(tiny_export, tmp_path_factory):
    """Two selectable models (copies of the tiny export) in one folder."""
    root = tmp_path_factory.mktemp("models")
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_export[0], root / name)
    return root


@pytest.fixture(scope="module")
def server(models_dir):
    served = Served(ServeSettings(models_dir, workers=2, queue=8))
    yield served
    served.stop()


def cli_images(folder, tmp_path, *args) -> list:
    """(pixels, parameters) of each PNG `runtime generate` writes for these options."""
    out = tmp_path / "cli.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(folder), "--quiet", "--out", str(out),
                                  *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    paths = [out] if out.exists() else sorted(tmp_path.glob("cli-*.png"))
    found = []
    for p in paths:
        with Image.open(p) as im:
            found.append((np.asarray(im.convert("RGB")), im.info["parameters"]))
    return found


def images_of(reply) -> list:
    assert reply.status == 200, reply.body
    return [decode_png(i) for i in reply.body["images"]]


CLI_BASE = ("--prompt", BASE["prompt"], "--negative-prompt", "blurry", "--steps", 4, "--guidance", 6.5,
            "--width", 64, "--height", 64, "--scheduler", "Euler a", "--prompt-syntax", "a1111")


def test_txt2img_batch_matches_runtime_generate(server, models_dir, tmp_path):
    reply = server.post("/sdapi/v1/txt2img", BASE | {"batch_size": 2})
    got = images_of(reply)
    want = cli_images(models_dir / "tiny-a", tmp_path, *CLI_BASE, "--seed", "123,124", "--batch", 2)
    assert len(got) == 2
    for (pixels, text), (cli_pixels, cli_text) in zip(got, want):
        assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, cli_pixels)
        assert text == cli_text
    info = json.loads(reply.body["info"])
    assert info["all_seeds"] == [123, 124] and info["seed"] == 123 and info["sampler_name"] == "Euler a"
    assert info["infotexts"] == [t for _, t in got] and info["sd_model_name"] == "tiny-a"
    assert info["all_prompts"] == [BASE["prompt"]] * 2 and info["batch_size"] == 2 and info["clip_skip"] == 1
    assert reply.body["parameters"]["steps"] == 4 and reply.body["parameters"]["enable_hr"] is False


def test_seed_minus_one_is_random_and_reported(server):
    reply = server.post("/sdapi/v1/txt2img", BASE | {"seed": -1})
    seed = json.loads(reply.body["info"])["seed"]
    assert isinstance(seed, int) and 0 <= seed < 4294967294
    again = server.post("/sdapi/v1/txt2img", BASE | {"seed": seed})
    assert np.array_equal(images_of(reply)[0][0], images_of(again)[0][0])
    assert f"Seed: {seed}," in images_of(reply)[0][1]


def test_n_iter_batches_take_the_next_seeds(server):
    reply = server.post("/sdapi/v1/txt2img", BASE | {"batch_size": 2, "n_iter": 2, "seed": 10})
    got = images_of(reply)
    assert json.loads(reply.body["info"])["all_seeds"] == [10, 11, 12, 13] and len(got) == 4
    second = images_of(server.post("/sdapi/v1/txt2img", BASE | {"batch_size": 2, "seed": 12}))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got[2:], second))
    assert [t.split("Seed: ")[1].split(",")[0] for _, t in got] == ["10", "11", "12", "13"]


def test_img2img_and_inpaint_match_runtime_generate(server, models_dir, tmp_path):
    init = Image.fromarray(images_of(server.post("/sdapi/v1/txt2img", BASE))[0][0])
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 40))
    mask.save(tmp_path / "mask.png")
    body = BASE | {"init_images": [png_b64(init, data_url=True)], "denoising_strength": 0.6, "seed": 7}
    got = images_of(server.post("/sdapi/v1/img2img", body))
    want = cli_images(models_dir / "tiny-a", tmp_path, *CLI_BASE, "--seed", 7, "--init-image",
                      tmp_path / "init.png", "--strength", 0.6)
    assert np.array_equal(got[0][0], want[0][0]) and got[0][1] == want[0][1]
    assert "Denoising strength: 0.6" in got[0][1]
    (tmp_path / "cli.png").unlink()
    body |= {"mask": png_b64(mask), "mask_blur": 4, "inpaint_full_res": True, "inpainting_fill": 1}
    got = images_of(server.post("/sdapi/v1/img2img", body))
    want = cli_images(models_dir / "tiny-a", tmp_path, *CLI_BASE, "--seed", 7, "--init-image", tmp_path / "init.png",
                      "--strength", 0.6, "--mask", tmp_path / "mask.png", "--mask-blur", 4, "--inpaint-full-res",
                      "--inpainting-fill", "original")
    assert np.array_equal(got[0][0], want[0][0])
    assert np.array_equal(got[0][0][:4], np.asarray(init)[:4])          # far from the (blurred) mask: kept


def test_webuiapi_default_calls_work(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=5)
    assert result.images[0].size == (64, 64) and result.info["seed"] == 5
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 40, 40))
    result = api.img2img(images=[result.images[0]], mask_image=mask, prompt="a dog", width=64, height=64, seed=5)
    assert result.images[0].size == (64, 64) and "Denoising strength: 0.75" in result.info["infotexts"][0]
    assert api.util_get_model_names() == ["tiny-a [%s]" % api.get_sd_models()[0]["hash"],
                                          "tiny-b [%s]" % api.get_sd_models()[1]["hash"]]
    assert api.util_get_current_model().startswith("tiny-a")
    assert api.get_progress()["state"]["job_count"] == 0 and api.interrupt() == {}
    info = api.png_info(result.images[0])
    assert info.info.startswith("a dog\n") and "Steps: 3" in info.info


def test_samplers_schedulers_and_lists(server):
    assert server.get("/sdapi/v1/samplers").body == a1111_samplers()
    assert server.get("/sdapi/v1/schedulers").body == a1111_schedulers()
    assert server.get("/sdapi/v1/loras").body == [] and server.get("/sdapi/v1/upscalers").body == []
    for sampler, schedule, label in (("DPM++ 2M", "Karras", "Karras"), ("DDIM", None, "Automatic"), ("LMS", "Exponential",
                                                                                              "Exponential")):
        reply = server.post("/sdapi/v1/txt2img", BASE | {"sampler_name": sampler, "scheduler": schedule, "steps": 2})
        info = json.loads(reply.body["info"])
        assert info["sampler_name"] == sampler and info["extra_generation_params"].get("Schedule type") == label


def test_options_switch_model_and_clip_skip(server, models_dir, tmp_path):
    titles = [m["title"] for m in server.get("/sdapi/v1/sd-models").body]
    assert [t.split()[0] for t in titles] == ["tiny-a", "tiny-b"]
    assert server.get("/sdapi/v1/options").body["sd_model_checkpoint"] == titles[0]
    try:
        assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": titles[1]}).status == 200
        assert server.get("/sdapi/v1/options").body["sd_model_checkpoint"] == titles[1]
        reply = server.post("/sdapi/v1/txt2img", BASE)
        assert json.loads(reply.body["info"])["sd_model_name"] == "tiny-b" and "Model: tiny-b" in images_of(reply)[0][1]
        once = server.post("/sdapi/v1/txt2img", BASE | {"override_settings": {"sd_model_checkpoint": "tiny-a",
                                                                              "CLIP_stop_at_last_layers": 2}})
        assert json.loads(once.body["info"])["sd_model_name"] == "tiny-a"
        assert server.get("/sdapi/v1/options").body["sd_model_checkpoint"] == titles[1]      # restored afterwards
        pixels, text = images_of(once)[0]
        want = cli_images(models_dir / "tiny-a", tmp_path, *CLI_BASE, "--seed", 123, "--clip-skip", 2)
        assert "Clip skip: 2" in text and text == want[0][1] and np.array_equal(pixels, want[0][0])
    finally:
        server.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-a"})


def test_progress_skip_and_interrupt(server):
    replies = []
    worker = threading.Thread(target=lambda: replies.append(server.post(
        "/sdapi/v1/txt2img", BASE | {"steps": 1000, "n_iter": 2, "seed": 1})))
    worker.start()
    state = wait_for(lambda: (p := server.get("/sdapi/v1/progress").body)["state"]["sampling_step"] > 0 and p)
    assert state["state"]["job_count"] == 2 and state["state"]["sampling_steps"] == 1000
    assert 0 < state["progress"] < 0.6 and state["eta_relative"] > 0
    pixels, _ = decode_png(state["current_image"])
    assert pixels.shape == (8, 8, 3)
    assert "current_image" not in server.get("/sdapi/v1/progress?skip_current_image=true").body or \
        server.get("/sdapi/v1/progress?skip_current_image=true").body["current_image"] is None
    assert server.post("/sdapi/v1/skip").status == 200
    wait_for(lambda: server.get("/sdapi/v1/progress").body["state"]["job_no"] == 1)
    assert server.post("/sdapi/v1/interrupt").body == {}
    worker.join(60)
    assert not worker.is_alive() and len(images_of(replies[0])) == 2        # each batch stopped at a step, decoded
    assert server.get("/sdapi/v1/progress").body["state"]["job_count"] == 0


def test_openai_images_route(server):
    reply = server.post("/v1/images/generations", {"prompt": "a lighthouse", "n": 2, "size": "64x64",
                                                   "response_format": "b64_json", "model": "dall-e-3"})
    assert reply.status == 200 and isinstance(reply.body["created"], int)
    images = [decode_png(d["b64_json"]) for d in reply.body["data"]]
    assert len(images) == 2 and all(p.shape == (64, 64, 3) and t.startswith("a lighthouse\n") for p, t in images)
    assert "Steps: 50" in images[0][1]                                   # the diffusers default, as the Python API
    bad = server.post("/v1/images/generations", {"prompt": "x", "size": "64x64", "response_format": "url"})
    assert bad.status == 400 and bad.body["error"]["param"] == "response_format"


def test_concurrent_requests_equal_serial_ones(server):
    bodies = [BASE | {"seed": 100 + k, "prompt": f"a lighthouse number {k}"} for k in range(4)]
    serial = [server.post("/sdapi/v1/txt2img", b).body["images"] for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda b: server.post("/sdapi/v1/txt2img", b).body["images"], bodies))
    assert concurrent == serial and len({s[0] for s in serial}) == 4
