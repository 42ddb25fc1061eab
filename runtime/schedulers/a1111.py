"""AUTOMATIC1111's sampler names and schedule types: the one table mapping them to our scheduler names.

Taken from A1111 1.10: modules/sd_samplers_kdiffusion.py (samplers_k_diffusion),
sd_samplers_timesteps.py and sd_samplers_lcm.py for samplers and their aliases,
modules/sd_schedulers.py for schedule types. As A1111's get_sampler_and_scheduler does,
an old combined name ("DPM++ 2M Karras") is split into sampler and schedule type, and
"Automatic" means the sampler's own default schedule (Karras for DPM++ 2M). Only samplers
and schedule types this package implements are listed; the schedule overrides are those of
the diffusers mapping (docs: "A1111/k-diffusion" -> "init with use_karras_sigmas=True", ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


def _m(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


@dataclass(frozen=True)
class A1111Sampler:
    """An A1111 sampler: its label, our registry name, A1111's aliases and options (as /sdapi/v1/samplers)."""

    label: str
    ours: str
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=_m)
    timesteps: bool = False  # an A1111 timestep sampler (DDIM, PLMS, UniPC): schedule types do not apply

    @property
    def default_schedule(self) -> str:
        """Name of the schedule "Automatic" stands for: A1111's options['scheduler'], else uniform."""
        return self.options.get("scheduler", "uniform")


@dataclass(frozen=True)
class A1111Schedule:
    """An A1111 schedule type and the scheduler-config overrides that give it here."""

    name: str
    label: str
    overrides: Mapping[str, Any] | None  # None: "Automatic", the sampler's default
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


_FLAGS_OFF = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

A1111_SCHEDULES: tuple[A1111Schedule, ...] = (
    A1111Schedule("automatic", "Automatic", None),
    A1111Schedule("uniform", "Uniform", _m(**_FLAGS_OFF), need_inner_model=True),
    A1111Schedule("karras", "Karras", _m(**{**_FLAGS_OFF, "use_karras_sigmas": True}), default_rho=7.0),
    A1111Schedule("exponential", "Exponential", _m(**{**_FLAGS_OFF, "use_exponential_sigmas": True})),
    A1111Schedule("sgm_uniform", "SGM Uniform", _m(**_FLAGS_OFF, timestep_spacing="trailing"),
                  aliases=("SGMUniform",), need_inner_model=True),
    A1111Schedule("simple", "Simple", _m(**_FLAGS_OFF, timestep_spacing="trailing"), need_inner_model=True),
    A1111Schedule("beta", "Beta", _m(**{**_FLAGS_OFF, "use_beta_sigmas": True}), need_inner_model=True),
)

_KARRAS, _EXP, _SDE = {"scheduler": "karras"}, {"scheduler": "exponential"}, {"brownian_noise": True}
A1111_SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", "dpm++2m", ("k_dpmpp_2m",), _m(**_KARRAS)),
    A1111Sampler("DPM++ 2M SDE", "dpm++2m-sde", ("k_dpmpp_2m_sde",), _m(**_EXP, **_SDE)),
    A1111Sampler("DPM++ 2M SDE Heun", "dpm++2m-sde-heun", ("k_dpmpp_2m_sde_heun",),
                 _m(**_EXP, **_SDE, solver_type="heun")),
    A1111Sampler("Euler a", "euler-a", ("k_euler_a", "k_euler_ancestral"), _m(uses_ensd=True)),
    A1111Sampler("Euler", "euler", ("k_euler",)),
    A1111Sampler("LMS", "lms", ("k_lms",)),
    A1111Sampler("Heun", "heun", ("k_heun",), _m(second_order=True)),
    A1111Sampler("DPM2", "dpm2", ("k_dpm_2",),
                 _m(**_KARRAS, discard_next_to_last_sigma=True, second_order=True)),
    A1111Sampler("DPM2 a", "dpm2-a", ("k_dpm_2_a",),
                 _m(**_KARRAS, discard_next_to_last_sigma=True, uses_ensd=True, second_order=True)),
    A1111Sampler("DDIM", "ddim", ("ddim",), timesteps=True),
    A1111Sampler("PLMS", "pndm", ("plms",), timesteps=True),
    A1111Sampler("UniPC", "unipc", ("unipc",), timesteps=True),
    A1111Sampler("LCM", "lcm", ("k_lcm",)),
)

# Aliases of the combined "<sampler> Karras" entries of A1111 before 1.9, still sent by clients.
_LEGACY_ALIASES = {"k_lms_ka": ("LMS", "karras"), "k_dpm_2_ka": ("DPM2", "karras"),
                   "k_dpm_2_a_ka": ("DPM2 a", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
                   "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras")}

_SAMPLERS = {n.lower(): s for s in A1111_SAMPLERS for n in (s.label, *s.aliases)}
_SCHEDULES = {n.lower(): s for s in A1111_SCHEDULES for n in (s.name, s.label, *s.aliases)}


def sampler_labels() -> list[str]:
    """A1111 sampler names this package implements, in A1111's order."""
    return [s.label for s in A1111_SAMPLERS]


def schedule_labels() -> list[str]:
    """A1111 schedule type labels this package implements."""
    return [s.label for s in A1111_SCHEDULES]


def find_schedule(name: str | None) -> A1111Schedule:
    """An A1111 schedule type by name, label or alias (case-insensitive); None is "Automatic"."""
    if name is None or not str(name).strip():
        return A1111_SCHEDULES[0]
    try:
        return _SCHEDULES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown or unsupported schedule type {name!r}; "
                         f"valid: {', '.join(schedule_labels())}") from None


def find_sampler(name: str) -> tuple[A1111Sampler, A1111Schedule | None] | None:
    """(sampler, schedule named in the name or None) of an A1111 name, alias or combined name; None if unknown."""
    key = name.strip().lower()
    if key in _LEGACY_ALIASES:
        label, schedule = _LEGACY_ALIASES[key]
        return _SAMPLERS[label.lower()], _SCHEDULES[schedule]
    if key in _SAMPLERS:
        return _SAMPLERS[key], None
    for suffix, schedule in _SCHEDULES.items():  # "DPM++ 2M Karras" -> DPM++ 2M + Karras
        if key.endswith(" " + suffix) and key[:-len(suffix) - 1] in _SAMPLERS:
            return _SAMPLERS[key[:-len(suffix) - 1]], schedule
    return None


def a1111_samplers() -> list[dict[str, Any]]:
    """The body of A1111's GET /sdapi/v1/samplers for the samplers implemented here."""
    return [{"name": s.label, "aliases": list(s.aliases), "options": dict(s.options)} for s in A1111_SAMPLERS]


def a1111_schedulers() -> list[dict[str, Any]]:
    """The body of A1111's GET /sdapi/v1/schedulers for the schedule types implemented here."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in A1111_SCHEDULES]


__all__ = ["A1111_SAMPLERS", "A1111_SCHEDULES", "A1111Sampler", "A1111Schedule", "a1111_samplers",
           "a1111_schedulers", "find_sampler", "find_schedule", "sampler_labels", "schedule_labels"]
