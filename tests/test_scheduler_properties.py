"""Properties of runtime.schedulers over random step counts and configurations (NumPy only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.schedulers import from_config, scheduler_names

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
SIGMA_BASED = {"euler", "euler-a", "heun", "lms", "dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "unipc", "dpm2",
               "dpm2-a", "dpm++2s", "deis", "dpm++2m-sde-heun", "dpm++2m-sde-karras", "unipc-karras"}
SCHEDULE_FLAGS = (None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def schedulers(draw):
    """A scheduler with a random spacing / parameterisation / beta schedule and a valid step count."""
    name = draw(st.sampled_from(scheduler_names()))
    options = {
        "timestep_spacing": draw(st.sampled_from(["leading", "trailing", "linspace"])),
        "prediction_type": draw(st.sampled_from(["epsilon", "v_prediction"])),
        "beta_schedule": draw(st.sampled_from(["scaled_linear", "linear", "squaredcos_cap_v2"])),
        "steps_offset": draw(st.sampled_from([0, 1])),
    }
    if name in {"euler", "heun", "lms", "unipc", "dpm2", "dpm2-a", "dpm++2m", "dpm++2m-sde", "dpm++2s", "deis"}:
        flag = draw(st.sampled_from(SCHEDULE_FLAGS))
        if flag:
            options[flag] = True
    if name in {"euler", "dpm++2m", "unipc", "dpm++2s"}:
        options["final_sigmas_type"] = draw(st.sampled_from(["zero", "sigma_min"]))
    if name == "pndm":
        options["skip_prk_steps"] = draw(st.booleans())
    s = from_config(SD15, name, **options)
    low = 4 if name == "pndm" and not options["skip_prk_steps"] else 1
    high = 50 if name in ("lcm", "tcd") else 200
    return s, draw(st.integers(low, high))


def rng_noise(seed: int):
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(shape).astype(np.float32)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    return (0.1 * x + 0.05 * np.sin(float(t) / 100 + np.arange(x.size).reshape(x.shape))).astype(np.float32)


@FAST
@given(schedulers())
def test_schedule_is_well_formed(case):
    s, n = case
    plan = s.plan(n)
    T = s.config.num_train_timesteps
    assert plan.num_inference_steps == n
    flow = s.name.startswith("flow-")           # flow matching: timestep = sigma * T, sigma from 1 down
    assert np.all(plan.timesteps >= 0) and np.all(plan.timesteps <= T if flow else plan.timesteps < T)
    # DPM2's midpoint timesteps are not rounded with Karras sigmas, and DPM2 ancestral's midpoint
    # (between sigma and sigma_down) may lie below the next sigma: only the main timesteps are ordered
    main = plan.timesteps[::2] if s.name in ("dpm2", "dpm2-a") else plan.timesteps
    assert np.all(np.diff(main) <= 0), "timesteps must not increase"
    assert np.isfinite(plan.init_noise_sigma) and plan.init_noise_sigma > 0
    if plan.sigmas is not None:
        sig = plan.sigmas.astype(np.float64)
        assert len(sig) == len(plan.timesteps) + 1
        assert np.all(np.diff(sig) <= 0), "sigmas must decrease"
        assert np.all(sig[:-1] > 0)
        if s.config.final_sigmas_type == "zero":
            assert sig[-1] == 0.0
        else:
            a0 = float(s.alphas_cumprod[0])
            assert np.isclose(sig[-1], np.sqrt((1 - a0) / a0), rtol=1e-6) or sig[-1] == sig[-2]
    else:
        assert s.name not in SIGMA_BASED and plan.init_noise_sigma == 1.0


@FAST
@given(schedulers(), st.integers(0, 2 ** 31 - 1),
       st.sampled_from([(1, 4, 4, 4), (2, 4, 3, 5), (1, 3, 8)]))
def test_steps_preserve_shape_and_are_deterministic(case, seed, shape):
    s, n = case
    n = min(n, 12)
    plan = s.plan(n)
    x = (np.random.default_rng(seed).standard_normal(shape) * plan.init_noise_sigma).astype(np.float32)
    runs = []
    for _ in range(2):
        state, y, noise = s.init_state(plan), x, rng_noise(seed)
        out = []
        for i in range(len(plan.timesteps)):
            y_in = s.scale_model_input(plan, i, y)
            assert y_in.shape == shape and y_in.dtype == np.float32
            y, state = s.step(plan, state, i, fake_model(y_in, plan.timesteps[i]), y, noise)
            assert y.shape == shape and y.dtype == np.float32
            out.append(y)
        runs.append(out)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(runs[0][-1]))


@FAST
@given(schedulers(), st.floats(0.0, 1.0))
def test_img2img_start_and_add_noise(case, strength):
    s, n = case
    plan = s.plan(n)
    start = s.img2img_start(plan, strength)
    assert 0 <= start <= n * s.order
    assert start >= s.img2img_start(plan, min(1.0, strength + 0.25))
    assert s.img2img_start(plan, 1.0) == 0
    if start < len(plan.timesteps):
        clean = np.ones((1, 4, 2, 2), np.float32)
        np.testing.assert_allclose(s.add_noise(plan, start, clean, np.zeros_like(clean)),
                                   clean * s.noise_level(plan, start).alpha, rtol=1e-6)


def test_runtime_package_does_not_import_torch():
    code = "import sys, runtime.schedulers as s; s.from_config({}, 'euler').plan(5); " \
           "sys.exit(any(m in sys.modules for m in ('torch', 'diffusers', 'scipy')))"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}).returncode == 0


@settings(max_examples=25, deadline=None, database=None)
@given(st.sampled_from(scheduler_names()), st.integers(1, 20))
def test_one_scheduler_serves_interleaved_runs(name, n):
    s = from_config(SD15, name)
    plan = s.plan(n)
    shape = (1, 4, 4, 4)
    xs = [np.full(shape, v, np.float32) for v in (0.5, -1.0)]

    def run(k, x, state, i):
        eps = fake_model(s.scale_model_input(plan, i, x), plan.timesteps[i]) * (k + 1)
        return s.step(plan, state, i, eps, x, lambda sh: np.full(sh, 0.1 * (k + 1), np.float32))

    alone = []
    for k, x in enumerate(xs):
        state = s.init_state(plan)
        for i in range(len(plan.timesteps)):
            x, state = run(k, x, state, i)
        alone.append(x)
    states, cur = [s.init_state(plan) for _ in xs], list(xs)
    for i in range(len(plan.timesteps)):
        for k in (1, 0):
            cur[k], states[k] = run(k, cur[k], states[k], i)
    for a, b in zip(cur, alone):
        np.testing.assert_array_equal(a, b)
