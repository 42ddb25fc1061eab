"""Parity of runtime.schedulers with diffusers' schedulers, step by step, plus registry checks."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.schedulers import describe, from_config, scheduler_names  # noqa: E402
from runtime.schedulers.registry import REGISTRY  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]  # diffusers' DPM2

SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "trained_betas": None,
}
SD2V = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
        "timestep_spacing": "leading"}
LCM_CONFIG = {
    "_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "original_inference_steps": 50,
    "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 1, "prediction_type": "epsilon",
    "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
}

# CLI name -> (diffusers class, the overrides the name implies)
DPM = "DPMSolverMultistepScheduler"
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm++2m": (DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++2m-sde": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde-heun": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}),
    "dpm++2m-sde-karras": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}
SHAPE = (1, 4, 8, 8)
TOL = 1e-5  # relative, max|a - b| / max|b|, unless diffusers' own float32 noise is larger


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for the UNet: a function of its input and timestep."""
    idx = np.arange(x.size, dtype=np.float64).reshape(x.shape)
    return (0.1 * x.astype(np.float64) + 0.05 * np.sin(float(t) / 100 + idx)).astype(np.float32)


def rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def _exact_quad(func, a, b, epsrel=None):
    """scipy.integrate.quad for the polynomial integrands of diffusers' LMS (Gauss-Legendre, exact)."""
    x, w = np.polynomial.legendre.leggauss(21)
    a, b = float(a), float(b)
    vals = [float(func((b - a) / 2 * xi + (a + b) / 2)) for xi in x]
    return (b - a) / 2 * float(np.dot(w, vals)), 0.0


def diffusers_class(cls_name: str):
    """The diffusers class; LMS needs scipy only for quad, replaced by an exact quadrature."""
    if cls_name == "LMSDiscreteScheduler":
        from diffusers.schedulers import scheduling_lms_discrete as lms
        if not hasattr(lms, "integrate"):
            lms.integrate = type("integrate", (), {"quad": staticmethod(_exact_quad)})
        return lms.LMSDiscreteScheduler
    return getattr(diffusers, cls_name)


def reference(name: str, config: dict, **overrides):
    cls_name, implied = REFERENCE[name]
    return diffusers_class(cls_name).from_config(config, **{**implied, **overrides})


def torch_noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


def start_index(n: int, strength: float, order: int) -> int:
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0) * order


def run_reference(ds, n, x_init, seed=0, strength=None, clean=None):
    """diffusers' own loop (as StableDiffusion(Img2Img)Pipeline drives it); returns every sample."""
    ds.set_timesteps(n)
    timesteps, start = ds.timesteps, 0
    gen = torch.Generator().manual_seed(seed)
    if strength is None:
        x = torch.from_numpy(x_init) * ds.init_noise_sigma
    else:
        start = start_index(n, strength, ds.order)
        if hasattr(ds, "set_begin_index"):
            ds.set_begin_index(start)
        x = ds.add_noise(torch.from_numpy(clean), torch.from_numpy(x_init), timesteps[start:start + 1])
    params = inspect.signature(ds.step).parameters
    kwargs = {"generator": gen} if "generator" in params else {}
    if "eta" in params:  # the pipeline passes its eta (0.0 by default) to every step that takes one
        kwargs["eta"] = 0.0
    out = [x.numpy().copy()]
    for t in timesteps[start:]:
        eps = torch.from_numpy(fake_model(ds.scale_model_input(x, t).numpy(), t.item()))
        x = ds.step(eps, t, x, **kwargs).prev_sample
        out.append(x.numpy().copy())
    return out


def run_ours(s, n, x_init, seed=0, strength=None, clean=None):
    plan = s.plan(n)
    noise = torch_noise(seed)
    if strength is None:
        start, x = 0, (x_init * np.float32(plan.init_noise_sigma)).astype(np.float32)
    else:
        start = s.img2img_start(plan, strength)
        x = s.add_noise(plan, start, clean, x_init)
    state = s.init_state(plan)
    out = [x]
    for i in range(start, len(plan.timesteps)):
        eps = fake_model(s.scale_model_input(plan, i, x), plan.timesteps[i])
        x, state = s.step(plan, state, i, eps, x, noise)
        assert x.dtype == np.float32 and x.shape == SHAPE
        out.append(x)
    return out


def check(name, config, n, *, overrides=None, key=None, **kw):
    overrides = overrides or {}
    ds = reference(name, config, **overrides)
    ours = from_config(config, name, **overrides)
    x_init = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
    ds.set_timesteps(n)
    plan = ours.plan(n)
    ref_t = ds.timesteps.numpy()
    # below t = 1 a sigma sits at the training table's floor; there DPM2 ancestral's midpoint comes from a float32
    # cancellation (sigma_down = sqrt(s1^2 - up^2)) whose last bits follow the CPU's exp/log kernels
    at_floor = ref_t < 1
    np.testing.assert_allclose(plan.timesteps[~at_floor], ref_t[~at_floor], rtol=1e-6, atol=2e-3)
    np.testing.assert_allclose(plan.timesteps[at_floor], ref_t[at_floor], atol=2e-2)
    if getattr(ds, "sigmas", None) is not None and plan.sigmas is not None:
        theirs = ds.sigmas.numpy()[:len(plan.sigmas)]  # DPM2 pads two more zeros that no step reads
        np.testing.assert_allclose(plan.sigmas, theirs, rtol=2e-6, atol=1e-7)
    assert plan.init_noise_sigma == pytest.approx(float(ds.init_noise_sigma), rel=1e-6)
    ref = run_reference(ds, n, x_init, **kw)
    got = run_ours(ours, n, x_init, **kw)
    assert len(got) == len(ref)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    # diffusers' own float32 rounding noise: how far it moves when its input moves by ~2 ulps
    nudged = (x_init * np.float32(1 + 2.5e-7)).astype(np.float32)
    bumped = run_reference(reference(name, config, **overrides), n, nudged, **kw)
    floor = max(rel(a, b) for a, b in zip(bumped, ref))
    label = key or name
    # zero terminal SNR starts at sigma 4096, where sigma^2 + 1 = 2^24 + 1 is not a float32: the first step's
    # scalings then follow each library's operation order and the CPU's kernels (3.4e-5 measured on an AMX Xeon)
    tol = 1e-4 if overrides.get("rescale_betas_zero_snr") else TOL
    assert max(errs) < max(tol, 3 * floor), f"{label} n={n}: step errors {errs}, diffusers noise {floor:.1e}"


STEPS = {"lcm": (1, 2, 4, 8), "tcd": (1, 2, 4, 8), "pndm": (1, 2, 10, 25), "heun": (1, 2, 10, 25)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parity_sd15(name):
    config = LCM_CONFIG if name in ("lcm", "tcd") else SD15
    for n in STEPS.get(name, (1, 2, 10, 25)):
        check(name, config, n)


@pytest.mark.parametrize("name", sorted(set(REFERENCE) - {"lcm"}))
def test_parity_v_prediction(name):
    for n in (3, 20):
        check(name, SD2V, n, key=f"{name}/v")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm++2m", "euler", "euler-a", "heun", "lms", "pndm", "unipc"])
def test_parity_timestep_spacing(name, spacing):
    for n in (7, 30):
        check(name, {**SD15, "timestep_spacing": spacing}, n, key=f"{name}/{spacing}")


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "unipc", "dpm++2m-sde"])
def test_parity_karras(name):
    for n in (5, 25):
        check(name, SD15, n, overrides={"use_karras_sigmas": True}, key=f"{name}/karras")


@pytest.mark.parametrize("name,strength", [
    ("ddim", 0.6), ("ddpm", 0.5), ("euler", 0.75), ("euler-a", 0.7), ("heun", 0.3), ("lms", 0.8),
    ("dpm++2m", 0.5), ("dpm++2m-karras", 0.4), ("dpm++2m-sde", 0.65), ("unipc", 0.55), ("pndm", 0.5),
    ("lcm", 0.5),
])
def test_parity_img2img(name, strength):
    clean = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    for n in (10, 25):
        s = from_config(SD15, name)
        assert s.img2img_start(s.plan(n), strength) == start_index(n, strength, s.order)
        check(name, SD15, n, strength=strength, clean=clean, key=f"{name}/img2img")


@pytest.mark.parametrize("overrides,n", [
    ({"skip_prk_steps": False}, 4), ({"skip_prk_steps": False}, 10), ({"skip_prk_steps": False}, 25),
    ({"skip_prk_steps": False, "prediction_type": "v_prediction"}, 12),
    ({"timestep_spacing": "trailing"}, 9),
])
def test_parity_pndm_variants(overrides, n):
    check("pndm", SD15, n, overrides=overrides, key="pndm/prk" if "skip_prk_steps" in overrides else "pndm/other")


@pytest.mark.parametrize("overrides,n", [
    ({"original_inference_steps": 100}, 6), ({"original_inference_steps": 20}, 20),
    ({"prediction_type": "v_prediction"}, 4), ({"timestep_spacing": "trailing"}, 3),
])
def test_parity_lcm_variants(overrides, n):
    check("lcm", LCM_CONFIG, n, overrides=overrides, key="lcm/variants")


@pytest.mark.parametrize("name,overrides", [
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("euler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddim", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True, "prediction_type": "sample"}),
    ("ddim", {"thresholding": True, "sample_max_value": 1.5}),
    ("ddpm", {"variance_type": "fixed_large", "clip_sample": True}),
    ("ddpm", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    ("heun", {"prediction_type": "sample", "clip_sample": True}),
    ("lms", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("dpm++2m", {"final_sigmas_type": "sigma_min"}),
    ("dpm++2m", {"solver_order": 3}),
    ("dpm++2m", {"solver_type": "heun", "lower_order_final": False}),
    ("dpm++2m", {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}),
    ("dpm++2m-sde", {"solver_order": 3, "solver_type": "heun"}),
    ("dpm++2m", {"euler_at_final": True, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                 "timestep_spacing": "trailing"}),
    ("unipc", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc", {"predict_x0": False, "disable_corrector": [2]}),
    ("unipc", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    ("unipc", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
])
def test_parity_options(name, overrides):
    for n in (6, 18):
        check(name, SD15, n, overrides=overrides, key=f"{name}/options")


def test_ddim_eta_matches_pipeline_eta():
    ds = reference("ddim", SD15)
    ours = from_config(SD15, "ddim", eta=0.7)
    assert ours.stochastic
    x_init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ds.set_timesteps(8)
    gen, x = torch.Generator().manual_seed(3), torch.from_numpy(x_init)
    plan, y, noise = ours.plan(8), x_init, torch_noise(3)
    for i, t in enumerate(ds.timesteps):
        x = ds.step(torch.from_numpy(fake_model(x.numpy(), t.item())), t, x, eta=0.7, generator=gen).prev_sample
        y, _ = ours.step(plan, ours.init_state(plan), i, fake_model(y, plan.timesteps[i]), y, noise)
        assert rel(y, x.numpy()) < TOL


def test_heun_two_steps_matches_float64_diffusers():
    """With 2 steps Heun's correction divides by the tiny last sigma; diffusers' float32 rounding then
    moves its result by ~3e-5, while float64 diffusers and this float64 implementation agree."""
    ds, ours = reference("heun", SD15), from_config(SD15, "heun")
    x_init = np.random.default_rng(2).standard_normal(SHAPE)
    ds.set_timesteps(2)
    x = torch.from_numpy(x_init) * ds.init_noise_sigma.double()
    plan, y = ours.plan(2), (x_init * plan_init(ours, 2)).astype(np.float32)
    state = ours.init_state(plan)
    idx = np.arange(x.numel(), dtype=np.float64).reshape(SHAPE)
    for i, t in enumerate(ds.timesteps):
        x_in = ds.scale_model_input(x, t)
        x = ds.step(0.1 * x_in + torch.from_numpy(0.05 * np.sin(t.item() / 100 + idx)), t, x).prev_sample
        y, state = ours.step(plan, state, i, fake_model(ours.scale_model_input(plan, i, y), plan.timesteps[i]), y)
        assert rel(y, x.numpy()) < 2e-6


def plan_init(s, n) -> float:
    return s.plan(n).init_noise_sigma


def test_concurrent_runs_do_not_interfere():
    for name in scheduler_names():
        s = from_config(LCM_CONFIG if name in ("lcm", "tcd") else SD15, name)
        plan = s.plan(6)
        xs = [np.random.default_rng(k).standard_normal(SHAPE).astype(np.float32) for k in (1, 2)]
        alone = [run_ours(s, 6, x, seed=k) for k, x in enumerate(xs)]
        noises = [torch_noise(k) for k in range(2)]
        states = [s.init_state(plan), s.init_state(plan)]
        cur = [x * np.float32(plan.init_noise_sigma) for x in xs]
        for i in range(len(plan.timesteps)):
            for k in (1, 0):
                eps = fake_model(s.scale_model_input(plan, i, cur[k]), plan.timesteps[i])
                cur[k], states[k] = s.step(plan, states[k], i, eps, cur[k], noises[k])
        for k in range(2):
            np.testing.assert_array_equal(cur[k], alone[k][-1], err_msg=name)


def test_class_names_map_to_the_diffusers_class():
    for name, (cls_name, implied) in REFERENCE.items():
        assert type(from_config(SD15, name)).diffusers_name == cls_name
        s = from_config({**SD15, **implied}, cls_name)
        assert type(s).diffusers_name == cls_name
    assert from_config(SD15).name == "pndm"
    assert from_config({**SD15, "_class_name": DPM, "algorithm_type": "sde-dpmsolver++"}).name == "dpm++2m-sde"
    assert from_config({**SD15, "use_karras_sigmas": True}, DPM).name == "dpm++2m-karras"
    assert from_config(SD15, "plms").name == "pndm"
    assert from_config(SD15, "euler_a").name == from_config(SD15, "euler-ancestral").name == "euler-a"


def test_describe():
    for entry in REGISTRY:
        for name in (entry.name, *entry.aliases, entry.cls.diffusers_name):
            text = describe(name)
            assert text and "\n" not in text
    with pytest.raises(ValueError):
        describe("nope")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="dpm\\+\\+2m-karras"):
        from_config(SD15, "nope")
    with pytest.raises(ValueError, match="_class_name"):
        from_config({"beta_start": 0.001})
    with pytest.raises(ValueError, match="unknown scheduler option"):
        from_config(SD15, "euler", use_karass_sigmas=True)


def test_from_config_ignores_unknown_and_foreign_keys():
    s = from_config({**SD15, "some_future_key": 3, "solver_order": 3, "timestep_spacing": "trailing"}, "ddim")
    assert s.config.timestep_spacing == "trailing" and s.config.solver_order == 2
    assert from_config(SD15, "ddim").config.set_alpha_to_one is False
    assert from_config(SD15, "lcm").config.set_alpha_to_one is False  # LCM accepts the key
    assert from_config({}, "lcm").config.set_alpha_to_one is True  # LCM's own default
    skipped = from_config({**SD15, "_use_default_values": ["steps_offset"]}, "ddim")
    assert skipped.config.steps_offset == 0
    assert from_config(SD15, "euler", rescale_betas_zero_snr=True, skip_prk_steps=True).config.rescale_betas_zero_snr


def test_defaults_match_diffusers_signatures():
    ours_only = {"eta", "sigma_min", "sigma_max", "solver_p",       # keys we add where diffusers has none:
                 "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "final_sigmas_type"}  # Euler a
    for entry in REGISTRY:
        params = inspect.signature(diffusers_class(entry.cls.diffusers_name).__init__).parameters
        for key, value in entry.cls.defaults.items():
            if key in ours_only and key not in params:
                continue
            assert key in params, (entry.name, key)
            expected = params[key].default
            assert (tuple(expected) if isinstance(expected, list) else expected) == value, (entry.name, key)


def test_errors():
    s = from_config(SD15, "ddim")
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            s.plan(bad)
    with pytest.raises(ValueError):
        from_config(LCM_CONFIG, "lcm").plan(51)
    with pytest.raises(ValueError):
        from_config(SD15, "pndm", skip_prk_steps=False).plan(3)
    with pytest.raises(ValueError):
        s.img2img_start(s.plan(10), 1.5)
    x = np.zeros(SHAPE, np.float32)
    for name in ("euler-a", "dpm++2m-sde", "ddpm", "lcm"):
        e = from_config(SD15, name)
        assert e.stochastic
        with pytest.raises(ValueError, match="noise"):
            p = e.plan(4)
            e.step(p, e.init_state(p), 0, x, x)
    with pytest.raises(ValueError, match="not supported"):
        from_config({**SD15, "use_flow_sigmas": True}, "dpm++2m")
    with pytest.raises(ValueError, match="only one of"):
        from_config({**SD15, "use_exponential_sigmas": True, "use_karras_sigmas": True}, "euler")
    with pytest.raises(ValueError, match="prediction_type"):
        from_config(SD15, "euler-a", prediction_type="sample")


def test_plan_is_read_only():
    plan = from_config(SD15, "euler").plan(10)
    with pytest.raises(ValueError):
        plan.timesteps[0] = 3
    assert plan.timesteps.dtype == np.float32 and plan.sigmas.dtype == np.float32
    assert from_config(SD15, "ddim").plan(10).timesteps.dtype == np.float64
