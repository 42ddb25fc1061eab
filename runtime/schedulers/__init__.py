"""Diffusion schedulers in NumPy, matching diffusers step for step, with pure (immutable) state.

    s = from_config(scheduler_config, "dpm++2m-karras")
    plan = s.plan(25)
    state = s.init_state(plan)
    x = noise * plan.init_noise_sigma
    for i in range(len(plan.timesteps)):
        eps = unet(s.scale_model_input(plan, i, x), plan.timesteps[i])
        x, state = s.step(plan, state, i, eps, x, noise_fn)

Layout: `schedules` (betas, timestep grids, sigmas), `parameterization` (epsilon / v /
sample -> x0, eps), `base` (the Scheduler interface), one module per sampler family,
and `registry` (the table of names).
"""
from .base import NoState, Plan, Scheduler
from .config import SchedulerConfig
from .registry import REGISTRY, a1111_name, describe, from_config, scheduler_names

__all__ = ["NoState", "Plan", "REGISTRY", "Scheduler", "SchedulerConfig", "a1111_name", "describe",
           "from_config", "scheduler_names"]
