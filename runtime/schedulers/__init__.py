"""Diffusion schedulers in NumPy, matching diffusers step for step, with pure (immutable) state.

    s = from_config(scheduler_config, "dpm++2m-karras")   # or an A1111 name: "DPM++ 2M Karras"
    plan = s.plan(25)
    state = s.init_state(plan)
    x = noise * plan.init_noise_sigma
    for i in range(len(plan.timesteps)):
        eps = unet(s.scale_model_input(plan, i, x), plan.timesteps[i])
        x, state = s.step(plan, state, i, eps, x, noise_fn)

Layout: `schedules` (betas, timestep grids, sigmas), `parameterization` (epsilon / v /
sample -> x0, eps), `base` (the Scheduler interface), one module per sampler family,
`registry` (the table of names) and `a1111` (AUTOMATIC1111's sampler and schedule names).
"""
from .a1111 import a1111_samplers, a1111_schedulers
from .base import NoState, Plan, Scheduler
from .config import SchedulerConfig
from .registry import REGISTRY, a1111_name, a1111_sampler, describe, from_config, resolve_sampler, scheduler_names

__all__ = ["NoState", "Plan", "REGISTRY", "Scheduler", "SchedulerConfig", "a1111_name", "a1111_sampler",
           "a1111_samplers", "a1111_schedulers", "describe", "from_config", "resolve_sampler", "scheduler_names"]
