"""AUTOMATIC1111 compatibility: its samplers and schedule types against diffusers, and its name table."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

from test_schedulers import LCM_CONFIG, SD2V, SD15, SHAPE, TOL, check, fake_model, rel, torch_noise  # noqa: E402

from runtime.schedulers import (  # noqa: E402
    a1111_name, a1111_sampler, a1111_samplers, a1111_schedulers, from_config, resolve_sampler, scheduler_names,
)
from runtime.schedulers.a1111 import A1111_SAMPLERS, A1111_SCHEDULES  # noqa: E402
from runtime.schedulers.k_samplers import ancestral_step  # noqa: E402
from runtime.schedulers.schedules import beta_ppf  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


# -- the new samplers, step by step against their diffusers schedulers -------------------------------

@pytest.mark.parametrize("spacing", ["linspace", "trailing"])  # leading: diffusers' KDPM2 has no init_noise_sigma
@pytest.mark.parametrize("name", ["dpm2", "dpm2-a", "dpm++2s", "deis", "dpm++2m-sde-karras",
                                  "dpm++2m-sde-heun", "unipc-karras"])
def test_new_samplers_match_diffusers(name, spacing):
    for n in (3, 16):
        check(name, {**SD15, "timestep_spacing": spacing}, n, key=f"{name}/{spacing}")


@pytest.mark.parametrize("name", ["dpm2", "dpm2-a", "dpm++2s", "deis", "unipc-karras"])
def test_new_samplers_v_prediction(name):
    for n in (4, 21):
        check(name, SD2V, n, key=f"{name}/v")


@pytest.mark.parametrize("name,strength", [("dpm2", 0.6), ("dpm2-a", 0.45), ("dpm++2s", 0.7), ("deis", 0.5),
                                           ("dpm++2m-sde-karras", 0.55)])
def test_new_samplers_img2img(name, strength):
    clean = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    for n in (10, 25):
        check(name, SD15, n, strength=strength, clean=clean, key=f"{name}/img2img")


@pytest.mark.parametrize("name,overrides", [
    ("dpm++2s", {"solver_order": 3}),
    ("dpm++2s", {"solver_order": 3, "solver_type": "heun"}),
    ("dpm++2s", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("dpm++2s", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm++2s", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}),
    ("dpm++2s", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    ("dpm++2s", {"thresholding": True, "prediction_type": "sample"}),
    ("dpm++2s", {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}),
    ("dpm++2s", {"use_karras_sigmas": True, "solver_order": 3}),
    ("deis", {"solver_order": 1}),
    ("deis", {"solver_order": 3}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    ("deis", {"thresholding": True, "sample_max_value": 1.5}),
    ("deis", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("dpm2", {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}),
    ("dpm2-a", {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}),
    ("dpm2-a", {"timestep_spacing": "leading", "steps_offset": 1}),
])
def test_new_sampler_options(name, overrides):
    for n in (1, 2, 6, 18):
        check(name, SD15, n, overrides=overrides, key=f"{name}/options")


@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
                                       {"original_inference_steps": 100}, {"clip_sample": True},
                                       {"timestep_spacing": "trailing"}])
def test_tcd_matches_diffusers(overrides):
    for n in (1, 2, 4, 8, 30):
        check("tcd", LCM_CONFIG, n, overrides=overrides, key="tcd")


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 1.0])
def test_tcd_eta_is_diffusers_gamma(eta):
    ds = diffusers.TCDScheduler.from_config(LCM_CONFIG)
    ours = from_config(LCM_CONFIG, "tcd", eta=eta)
    assert ours.stochastic == (eta > 0)
    x_init = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    ds.set_timesteps(6)
    gen, x = torch.Generator().manual_seed(5), torch.from_numpy(x_init)
    plan, y, noise = ours.plan(6), x_init, torch_noise(5)
    state = ours.init_state(plan)
    for i, t in enumerate(ds.timesteps):
        x = ds.step(torch.from_numpy(fake_model(x.numpy(), t.item())), t, x, eta=eta, generator=gen).prev_sample
        y, state = ours.step(plan, state, i, fake_model(y, plan.timesteps[i]), y, noise)
        assert rel(y, x.numpy()) < TOL


# -- schedule types: Karras, exponential, beta sigmas; trailing spacing with either final sigma ---------

@pytest.mark.parametrize("kind", sorted(FLAGS))
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpm2", "dpm2-a", "dpm++2m", "dpm++2m-sde", "dpm++2s",
                                  "deis", "unipc"])
def test_sigma_schedules_match_diffusers(name, kind):
    """check() compares the plan's timesteps and sigmas with diffusers' before stepping."""
    for n in (4, 15):
        check(name, SD15, n, overrides={FLAGS[kind]: True}, key=f"{name}/{kind}")


@pytest.mark.parametrize("kind", ["exponential", "beta"])
def test_sigma_schedules_use_the_configured_range(kind):
    check("euler", SD15, 9, overrides={FLAGS[kind]: True, "sigma_min": 0.1, "sigma_max": 10.0}, key="euler/range")


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("name", ["euler", "dpm++2m", "dpm++2s", "unipc"])
def test_trailing_spacing_with_final_sigma(name, final):
    for n in (5, 12):
        check(name, SD15, n, overrides={"timestep_spacing": "trailing", "final_sigmas_type": final},
              key=f"{name}/trailing")


@pytest.mark.parametrize("kind", sorted(FLAGS))
def test_schedule_keys_in_scheduler_config_are_honoured(kind):
    config = {**SD15, "_class_name": "EulerDiscreteScheduler", FLAGS[kind]: True, "timestep_spacing": "trailing"}
    ours, theirs = from_config(config), diffusers.EulerDiscreteScheduler.from_config(config)
    assert ours.config.sigma_schedule == kind
    theirs.set_timesteps(10)
    np.testing.assert_allclose(ours.plan(10).sigmas, theirs.sigmas.numpy(), rtol=2e-6, atol=1e-7)


def test_two_sigma_schedules_are_refused():
    with pytest.raises(ValueError, match="only one of"):
        from_config({**SD15, "use_beta_sigmas": True, "use_karras_sigmas": True}, "dpm++2m")


def test_beta_quantiles_match_scipy():
    q = np.concatenate([np.linspace(0, 1, 1001), [1e-12, 1e-6, 1 - 1e-9]])
    for a, b in ((0.6, 0.6), (3.0, 1.5), (2.0, 5.0)):
        np.testing.assert_allclose(beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b), rtol=1e-9, atol=1e-13)


# -- eta --------------------------------------------------------------------------------------------

def _run(s, n, seed=0):
    plan, x = s.plan(n), np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    x, state, noise = x * np.float32(plan.init_noise_sigma), s.init_state(plan), torch_noise(seed)
    for i in range(len(plan.timesteps)):
        x, state = s.step(plan, state, i, fake_model(s.scale_model_input(plan, i, x), plan.timesteps[i]), x, noise)
    return x


def test_ancestral_eta_zero_is_the_deterministic_sampler():
    for ancestral, plain in (("euler-a", "euler"), ("dpm2-a", "dpm2")):
        s = from_config(SD15, ancestral, eta=0.0)
        assert not s.stochastic
        np.testing.assert_allclose(_run(s, 8), _run(from_config(SD15, plain), 8), rtol=1e-5, atol=1e-5)


def test_ancestral_step_is_k_diffusion_get_ancestral_step():
    for s, s_next, eta in ((14.6, 9.1, 1.0), (3.0, 1.2, 0.5), (1.0, 0.2, 2.0), (0.5, 0.0, 1.0)):
        up = min(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        down, got_up = ancestral_step(s, s_next, eta)
        assert got_up == pytest.approx(up) and down == pytest.approx((s_next ** 2 - up ** 2) ** 0.5)
    assert from_config(SD15, "euler-a").config.eta == 1.0  # diffusers' ancestral sampling


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Beta"])
def test_euler_a_runs_on_every_schedule_type_as_a1111(schedule):
    name, flags = resolve_sampler("Euler a", schedule)
    ancestral = from_config(SD15, name, **flags)
    euler = from_config(SD15, "euler", **resolve_sampler("Euler", schedule)[1])
    np.testing.assert_array_equal(ancestral.plan(12).sigmas, euler.plan(12).sigmas)
    deterministic = from_config(SD15, name, **flags, eta=0.0)
    np.testing.assert_allclose(_run(deterministic, 8), _run(euler, 8), rtol=1e-5, atol=1e-5)


# -- the A1111 name table ---------------------------------------------------------------------------

CLASSES = {"dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-sde": "DPMSolverMultistepScheduler",
           "dpm++2m-sde-heun": "DPMSolverMultistepScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
           "euler": "EulerDiscreteScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
           "dpm2": "KDPM2DiscreteScheduler", "dpm2-a": "KDPM2AncestralDiscreteScheduler",
           "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler",
           "lcm": "LCMScheduler"}


def test_every_a1111_name_and_alias_resolves():
    for sampler in A1111_SAMPLERS:
        for name in (sampler.label, sampler.label.upper(), *sampler.aliases):
            registry_name, _ = resolve_sampler(name)
            assert registry_name in scheduler_names()
            assert type(from_config(SD15, name)).diffusers_name == CLASSES[sampler.ours], name


KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}
UNIFORM = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


@pytest.mark.parametrize("name,schedule,expected", [
    ("DPM++ 2M", None, ("dpm++2m-karras", KARRAS)),           # A1111: Automatic is Karras for DPM++ 2M
    ("DPM++ 2M", "Automatic", ("dpm++2m-karras", KARRAS)),
    ("DPM++ 2M", "Uniform", ("dpm++2m", UNIFORM)),
    ("DPM++ 2M Karras", None, ("dpm++2m-karras", KARRAS)),    # old combined name
    ("dpm++ 2m karras", None, ("dpm++2m-karras", KARRAS)),
    ("k_dpmpp_2m_ka", None, ("dpm++2m-karras", KARRAS)),
    ("k_dpmpp_2m", "karras", ("dpm++2m-karras", KARRAS)),
    ("DPM++ 2M SDE", None, ("dpm++2m-sde", {**UNIFORM, "use_exponential_sigmas": True})),
    ("DPM++ 2M SDE Karras", None, ("dpm++2m-sde-karras", KARRAS)),
    ("DPM++ 2M SDE", "Karras", ("dpm++2m-sde-karras", KARRAS)),
    ("DPM++ 2M SDE Heun", "Beta", ("dpm++2m-sde-heun", {**UNIFORM, "use_beta_sigmas": True})),
    ("Euler a", None, ("euler-a", UNIFORM)),                    # any schedule type, as k-diffusion
    ("k_euler_a", "Automatic", ("euler-a", UNIFORM)),
    ("Euler a", "Karras", ("euler-a", KARRAS)),
    ("Euler", "SGM Uniform", ("euler", {**UNIFORM, "timestep_spacing": "trailing"})),
    ("Euler", "exponential", ("euler", {**UNIFORM, "use_exponential_sigmas": True})),
    ("DPM2", None, ("dpm2", KARRAS)),
    ("DPM2 a", "Uniform", ("dpm2-a", UNIFORM)),
    ("DPM2 a Karras", None, ("dpm2-a", KARRAS)),
    ("UniPC", "Karras", ("unipc-karras", KARRAS)),
    ("UniPC", None, ("unipc", UNIFORM)),
    ("DDIM", "Karras", ("ddim", {})),                          # A1111's timestep samplers ignore schedule types
    ("PLMS", None, ("pndm", {})),
    ("LCM", None, ("lcm", {})),
    ("dpm++2m", None, ("dpm++2m", {})),                        # our names keep the folder's configuration
    ("dpm++2m-karras", "Uniform", ("dpm++2m", UNIFORM)),
    ("euler", "Karras", ("euler", KARRAS)),
    ("euler_a", None, ("euler-a", {})),
])
def test_resolve_sampler(name, schedule, expected):
    assert resolve_sampler(name, schedule) == expected


def test_from_config_takes_a1111_names():
    assert vars(from_config(SD15, "DPM++ 2M Karras").config) == vars(from_config(SD15, "dpm++2m-karras").config)
    assert from_config(SD15, "DPM++ 2M").name == "dpm++2m-karras"
    assert from_config(SD15, "Euler a").name == "euler-a"
    assert from_config(SD15, "DPM++ 2M SDE").config.use_exponential_sigmas
    assert from_config({**SD15, "use_karras_sigmas": True}, "Euler").config.use_karras_sigmas is False  # Automatic


@pytest.mark.parametrize("name,schedule,match", [
    ("nope", None, "unknown scheduler 'nope'; valid names: .*dpm\\+\\+2m-karras.*Euler a"),
    ("DPM++ 2S a", None, "unknown scheduler"),                    # not implemented (no diffusers scheduler)
    ("Euler", "KL Optimal", "unknown or unsupported schedule type 'KL Optimal'; valid: Automatic"),
    ("LCM", "Karras", "LCM does not support schedule type 'Karras'; valid: Automatic, Uniform"),
])
def test_unknown_names_raise_one_line(name, schedule, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve_sampler(name, schedule)
    assert "\n" not in str(err.value)
    if schedule is None:
        with pytest.raises(ValueError, match="unknown scheduler"):
            from_config(SD15, name)


@pytest.mark.parametrize("name,expected", [
    ("pndm", ("PLMS", "Automatic")), ("ddim", ("DDIM", "Automatic")), ("euler-a", ("Euler a", "Automatic")),
    ("euler", ("Euler", "Automatic")), ("dpm++2m", ("DPM++ 2M", "Uniform")), ("DPM++ 2M", ("DPM++ 2M", "Karras")),
    ("dpm++2m-karras", ("DPM++ 2M", "Karras")), ("dpm++2m-sde", ("DPM++ 2M SDE", "Uniform")),
    ("dpm++2m-sde-karras", ("DPM++ 2M SDE", "Karras")), ("dpm++2m-sde-heun", ("DPM++ 2M SDE Heun", "Uniform")),
    ("dpm2", ("DPM2", "Uniform")), ("unipc-karras", ("UniPC", "Karras")), ("deis", ("deis", None)),
    ("tcd", ("tcd", None)), ("dpm++2s", ("dpm++2s", None)),
])
def test_a1111_infotext_names(name, expected):
    assert a1111_sampler(name) == expected


def test_a1111_name_is_one_string_a1111_reads_back():
    assert a1111_name("pndm") == "PLMS" and a1111_name("euler-a") == "Euler a"
    assert a1111_name("dpm++2m-karras") == "DPM++ 2M Karras" and a1111_name("dpm++2m") == "DPM++ 2M Uniform"
    assert a1111_name("nope") == "nope" and a1111_name(None) is None
    assert a1111_sampler(from_config(SD15, "euler", use_exponential_sigmas=True)) == ("Euler", "Exponential")
    assert a1111_name(from_config(SD15, "DPM++ 2M SDE")) == "DPM++ 2M SDE Exponential"
    trailing = from_config({**SD15, "timestep_spacing": "trailing"}, "euler-a")
    assert a1111_sampler(trailing) == ("Euler a", "SGM Uniform")


@pytest.mark.parametrize("name", [n for n in scheduler_names() if a1111_sampler(n)[1] is not None])
def test_written_names_resolve_to_the_same_scheduler(name):
    for config in (SD15, {**SD15, "timestep_spacing": "trailing"}):
        ours = from_config(config, name)
        registry_name, overrides = resolve_sampler(*a1111_sampler(ours))
        again = [from_config(config, registry_name, **overrides)]
        if config is SD15:
            again.append(from_config(config, a1111_name(name)))
        for s in again:
            assert type(s) is type(ours)
            assert s.config.sigma_schedule == ours.config.sigma_schedule
            assert s.config.timestep_spacing == ours.config.timestep_spacing


def test_api_lists():
    samplers = a1111_samplers()
    assert [s["name"] for s in samplers] == [s.label for s in A1111_SAMPLERS]
    by_name = {s["name"]: s for s in samplers}
    assert by_name["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"],
                                   "options": {"scheduler": "karras"}}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    schedulers = a1111_schedulers()
    assert {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
            "need_inner_model": False} in schedulers
    for entry in schedulers:
        assert set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
        for key in (entry["name"], entry["label"], *(entry["aliases"] or ())):
            resolve_sampler("DPM++ 2M", key)
    assert len({s.label for s in A1111_SCHEDULES}) == len(A1111_SCHEDULES)
