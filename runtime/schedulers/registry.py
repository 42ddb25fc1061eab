"""The one table of schedulers: CLI names, aliases, diffusers classes, overrides, descriptions."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .base import Scheduler
from .config import KNOWN_KEYS, SchedulerConfig, resolve
from .ddim import DDIM, DDPM
from .dpm_solver import DPMSolverMultistep
from .k_samplers import LMS, Euler, EulerAncestral, Heun
from .lcm import LCM
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
    a1111: str = ""               # the sampler's name in AUTOMATIC1111's PNG parameters


def _o(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


REGISTRY: tuple[Entry, ...] = (
    Entry("ddim", DDIM, "DDIM, deterministic (Song et al. 2020)", a1111="DDIM"),
    Entry("ddpm", DDPM, "DDPM ancestral sampling, stochastic (Ho et al. 2020)", a1111="DDPM"),
    Entry("dpm++2m", DPMSolverMultistep, "DPM-Solver++(2M) multistep (Lu et al. 2022)",
          _o(algorithm_type="dpmsolver++", solver_order=2), a1111="DPM++ 2M"),
    Entry("dpm++2m-karras", DPMSolverMultistep, "DPM-Solver++(2M) with Karras sigmas",
          _o(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True), a1111="DPM++ 2M Karras"),
    Entry("dpm++2m-sde", DPMSolverMultistep, "SDE-DPM-Solver++(2M), stochastic",
          _o(algorithm_type="sde-dpmsolver++", solver_order=2), a1111="DPM++ 2M SDE"),
    Entry("euler", Euler, "Euler in sigma (Karras et al. 2022)", aliases=("k_euler",), a1111="Euler"),
    Entry("euler-a", EulerAncestral, "Euler ancestral, stochastic (k-diffusion)",
          aliases=("euler_a", "euler-ancestral", "k_euler_a"), a1111="Euler a"),
    Entry("heun", Heun, "Heun 2nd order, two UNet calls per step (Karras et al. 2022)", a1111="Heun"),
    Entry("lcm", LCM, "Latent Consistency Model sampling, for LCM weights (Luo et al. 2023)", a1111="LCM"),
    Entry("lms", LMS, "Linear multistep, order 4 (k-diffusion)", aliases=("k_lms",), a1111="LMS"),
    Entry("pndm", PNDM, "PNDM / PLMS pseudo linear multistep (Liu et al. 2022)", aliases=("plms",), a1111="PLMS"),
    Entry("unipc", UniPC, "UniPC predictor-corrector, bh2 (Zhao et al. 2023)", a1111="UniPC"),
)

_BY_NAME = {n: e for e in REGISTRY for n in (e.name, *e.aliases)}
_BY_CLASS = {e.cls.diffusers_name: e.cls for e in REGISTRY}


def scheduler_names() -> list[str]:
    """CLI names, sorted (aliases not included)."""
    return sorted(e.name for e in REGISTRY)


def _valid_names() -> str:
    return ", ".join(scheduler_names() + sorted(_BY_CLASS))


def _entry(name: str) -> Entry:
    """Entry of a CLI name or alias (case-insensitive)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {_valid_names()}") from None


def a1111_name(name: str) -> str:
    """AUTOMATIC1111's sampler name for a CLI name (the name itself when it has none)."""
    return _BY_NAME[name].a1111 if name in _BY_NAME and _BY_NAME[name].a1111 else name


def describe(name: str) -> str:
    """One-line description of a CLI name, alias or diffusers class name."""
    if name in _BY_CLASS:
        return _display_entry(_BY_CLASS[name], None).description
    return _entry(name).description


def _display_entry(cls: type[Scheduler], cfg: SchedulerConfig | None) -> Entry:
    """The CLI entry of a class whose overrides the resolved config satisfies (most specific first)."""
    entries = [e for e in REGISTRY if e.cls is cls]
    if cfg is not None:
        fits = [e for e in entries if all(getattr(cfg, k) == v for k, v in e.overrides.items())]
        entries = sorted(fits, key=lambda e: -len(e.overrides)) or entries
    return entries[0]


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
    else:
        entry = _entry(target)
        cls, implied, label = entry.cls, entry.overrides, entry.name
    cfg = resolve(cls.defaults, config, implied, overrides, class_name=cls.diffusers_name)
    return cls(config=cfg, name=label or _display_entry(cls, cfg).name)
