"""The one table of schedulers: CLI names, aliases, diffusers classes, overrides, descriptions.

Names also resolve from AUTOMATIC1111's sampler names and schedule types (table in a1111.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from . import a1111
from .base import Scheduler
from .config import KNOWN_KEYS, resolve
from .ddim import DDIM, DDPM
from .deis import DEIS
from .dpm2 import DPM2, DPM2Ancestral
from .dpm_singlestep import DPMSolverSinglestep
from .dpm_solver import DPMSolverMultistep
from .flow_match import FlowMatchEuler, FlowMatchHeun
from .k_samplers import LMS, Euler, EulerAncestral, Heun
from .lcm import LCM, TCD
from .pndm import PNDM
from .unipc import UniPC


@dataclass(frozen=True)
class Entry:
    """A CLI name: its implementation, the config overrides it implies, and a one-line description."""

    name: str
    cls: type[Scheduler]
    description: str
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    aliases: tuple[str, ...] = ()


def _o(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


_PP2M = _o(algorithm_type="dpmsolver++", solver_order=2)
_SDE2M = _o(algorithm_type="sde-dpmsolver++", solver_order=2)


REGISTRY: tuple[Entry, ...] = (
    Entry("ddim", DDIM, "DDIM, deterministic (Song et al. 2020)"),
    Entry("ddpm", DDPM, "DDPM ancestral sampling, stochastic (Ho et al. 2020)"),
    Entry("deis", DEIS, "DEIS multistep, log-rho (Zhang & Chen 2022)"),
    Entry("dpm++2m", DPMSolverMultistep, "DPM-Solver++(2M) multistep (Lu et al. 2022)", _PP2M),
    Entry("dpm++2m-karras", DPMSolverMultistep, "DPM-Solver++(2M) with Karras sigmas",
          _o(**_PP2M, use_karras_sigmas=True)),
    Entry("dpm++2m-sde", DPMSolverMultistep, "SDE-DPM-Solver++(2M), stochastic", _SDE2M),
    Entry("dpm++2m-sde-heun", DPMSolverMultistep, "SDE-DPM-Solver++(2M), Heun's second-order term, stochastic",
          _o(**_SDE2M, solver_type="heun")),
    Entry("dpm++2m-sde-karras", DPMSolverMultistep, "SDE-DPM-Solver++(2M) with Karras sigmas, stochastic",
          _o(**_SDE2M, use_karras_sigmas=True)),
    Entry("dpm++2s", DPMSolverSinglestep, "DPM-Solver++(2S) singlestep (Lu et al. 2022)", _PP2M,
          aliases=("dpm++-singlestep",)),
    Entry("dpm2", DPM2, "DPM2, midpoint in log sigma, two UNet calls per step (Lu et al. 2022; k-diffusion)"),
    Entry("dpm2-a", DPM2Ancestral, "DPM2 ancestral, stochastic (k-diffusion)", aliases=("dpm2_a",)),
    Entry("euler", Euler, "Euler in sigma (Karras et al. 2022)"),
    Entry("euler-a", EulerAncestral, "Euler ancestral, stochastic (k-diffusion)",
          aliases=("euler_a", "euler-ancestral")),
    Entry("flow-euler", FlowMatchEuler, "Flow-matching Euler, for rectified-flow models such as SD3 "
          "(Esser et al. 2024)", aliases=("flow_euler", "flowmatch-euler")),
    Entry("flow-heun", FlowMatchHeun, "Flow-matching Heun, two model calls per step, for rectified-flow models",
          aliases=("flow_heun", "flowmatch-heun")),
    Entry("heun", Heun, "Heun 2nd order, two UNet calls per step (Karras et al. 2022)"),
    Entry("lcm", LCM, "Latent Consistency Model sampling, for LCM weights (Luo et al. 2023)"),
    Entry("lms", LMS, "Linear multistep, order 4 (k-diffusion)"),
    Entry("pndm", PNDM, "PNDM / PLMS pseudo linear multistep (Liu et al. 2022)", aliases=("plms",)),
    Entry("tcd", TCD, "Trajectory Consistency Distillation sampling, for TCD weights (Zheng et al. 2024)"),
    Entry("unipc", UniPC, "UniPC predictor-corrector, bh2 (Zhao et al. 2023)"),
    Entry("unipc-karras", UniPC, "UniPC with Karras sigmas", _o(use_karras_sigmas=True)),
)

_BY_NAME = {n: e for e in REGISTRY for n in (e.name, *e.aliases)}
_BY_CLASS = {e.cls.diffusers_name: e.cls for e in REGISTRY}


def scheduler_names() -> list[str]:
    """CLI names, sorted (aliases not included)."""
    return sorted(e.name for e in REGISTRY)


def _valid_names() -> str:
    return ", ".join(scheduler_names() + sorted(_BY_CLASS) + a1111.sampler_labels())


def _entry(name: str) -> Entry:
    """Entry of a CLI name or alias (case-insensitive)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {_valid_names()}") from None


def _satisfies(overrides: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    return all(values.get(k) == v for k, v in overrides.items())


def _display_entry(cls: type[Scheduler], values: Mapping[str, Any] | None) -> Entry:
    """The entry of cls with the most overrides that the option values all satisfy (the first without values)."""
    entries = [e for e in REGISTRY if e.cls is cls]
    fits = [e for e in entries if values is not None and _satisfies(e.overrides, values)]
    return max(fits, key=lambda e: len(e.overrides)) if fits else entries[0]


def _applies(schedule: a1111.A1111Schedule, cls: type[Scheduler]) -> bool:
    """Whether cls accepts every option a schedule type turns on (A1111 timestep samplers ignore the rest)."""
    on = [k for k, v in (schedule.overrides or {}).items() if v is not False]
    return all(k in cls.defaults for k in on)


def resolve_sampler(name: str, schedule_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """(registry name, config overrides) of a CLI name or alias, or an A1111 sampler name and schedule type."""
    # A1111 names behave as in A1111: case-insensitive, with aliases ("k_dpmpp_2m") and old combined names
    # ("DPM++ 2M Karras"); schedule type None / "Automatic" is the sampler's own default (Karras for
    # DPM++ 2M and DPM2, exponential for DPM++ 2M SDE, else uniform). Our names keep the folder's config.
    key = str(name).strip()
    found = None if key in _BY_NAME else a1111.find_sampler(key)  # "DPM2" is A1111's, "dpm2" ours
    if found is not None:
        sampler, named = found
        entry = _entry(sampler.ours)
    elif key.lower() in _BY_NAME:
        entry, sampler, named = _BY_NAME[key.lower()], None, None
    else:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {_valid_names()}")
    schedule = named or a1111.find_schedule(schedule_type)
    if schedule.overrides is None:  # Automatic
        if sampler is None:
            return entry.name, {}
        schedule = a1111.find_schedule(sampler.default_schedule)
    accepted = {k: v for k, v in schedule.overrides.items() if k in entry.cls.defaults}
    if not _applies(schedule, entry.cls) and not (sampler is not None and sampler.timesteps):
        valid = [sch.label for sch in a1111.A1111_SCHEDULES if _applies(sch, entry.cls)]
        raise ValueError(f"{sampler.label if sampler else entry.name} does not support schedule type "
                         f"{schedule.label!r}; valid: {', '.join(valid)}")
    return _display_entry(entry.cls, {**entry.cls.defaults, **entry.overrides, **accepted}).name, accepted


def a1111_sampler(scheduler: Scheduler | str) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type) for the "Sampler" and "Schedule type" infotext fields."""
    # As A1111 writes them: "Automatic" for a sampler's own uniform default, else the effective schedule
    # ("Karras" for DPM++ 2M; trailing spacing is "SGM Uniform"); (our name, None) where A1111 has no
    # such sampler (DEIS, TCD, DDPM, DPM++ 2S).
    s = scheduler if isinstance(scheduler, Scheduler) else from_config({}, scheduler)
    cfg = s.config
    fits = [a for a in a1111.A1111_SAMPLERS
            if _entry(a.ours).cls is type(s) and _satisfies(_entry(a.ours).overrides, vars(cfg))]
    if not fits:
        return s.name, None
    sampler = max(fits, key=lambda a: len(_entry(a.ours).overrides))
    kind = cfg.sigma_schedule or ("sgm_uniform" if cfg.timestep_spacing == "trailing" else "uniform")
    if kind == "uniform" and (sampler.timesteps or sampler.default_schedule == "uniform"):
        return sampler.label, "Automatic"
    return sampler.label, a1111.find_schedule(kind).label


def a1111_name(name: Scheduler | str) -> str:
    """A1111's one-string "Sampler" for a scheduler or name: "Euler a", "DPM++ 2M Karras", "DPM++ 2M Uniform"."""
    # Pass the Scheduler itself where its config may differ from its name's (a schedule type chosen apart).
    if not isinstance(name, (str, Scheduler)):
        return name
    try:
        label, schedule = a1111_sampler(name)
    except ValueError:
        return name
    return label if schedule in (None, "Automatic") else f"{label} {schedule}"


def describe(name: str) -> str:
    """One-line description of a CLI name, alias, diffusers class name or A1111 sampler name."""
    if name in _BY_CLASS:
        return _display_entry(_BY_CLASS[name], None).description
    return _entry(resolve_sampler(name)[0]).description


def from_config(config: Mapping[str, Any], name: str | None = None, **overrides: Any) -> Scheduler:
    """A scheduler from a diffusers scheduler config, as `SchedulerX.from_config(config, **overrides)`."""
    unknown = sorted(set(overrides) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown scheduler option(s): {', '.join(unknown)}")
    target = name if name is not None else config.get("_class_name")
    if not target:
        raise ValueError("no scheduler name given and the config has no _class_name; "
                         f"valid names: {_valid_names()}")
    if target in _BY_CLASS:
        cls, implied, label = _BY_CLASS[target], {}, None
    else:  # a CLI name, alias or A1111 sampler name
        registry_name, schedule = resolve_sampler(target)
        entry = _entry(registry_name)
        cls, implied, label = entry.cls, {**entry.overrides, **schedule}, entry.name
    cfg = resolve(cls.defaults, config, implied, overrides, class_name=cls.diffusers_name,
                  supported=cls.supported_flags)
    return cls(config=cfg, name=label or _display_entry(cls, vars(cfg)).name)
