"""Scheduler configuration: one frozen record, filled from a diffusers scheduler_config.json.

Each scheduler lists the keys its diffusers class accepts, with that class's defaults.
Like diffusers' `SchedulerX.from_config(other_config)`, keys a class does not accept are
ignored and keys listed in "_use_default_values" fall back to the class defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

# Options of diffusers classes that this runtime does not implement: accepted while off.
UNSUPPORTED_FLAGS = ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting", "solver_p")


@dataclass(frozen=True)
class SchedulerConfig:
    """Every option any scheduler here reads; a field a class does not accept keeps its neutral default."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0  # DDIM / ancestral eta, TCD gamma; a pipeline or step() argument in diffusers
    skip_prk_steps: bool = False
    variance_type: str | None = "fixed_small"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    predict_x0: bool = True
    disable_corrector: tuple[int, ...] = ()
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    shift: float = 1.0                          # flow matching (SD3): timestep shift and its variants
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    @property
    def sigma_schedule(self) -> str | None:
        """The sigma schedule the use_*_sigmas flags ask for ("karras", "exponential", "beta"), or None."""
        kinds = [k for k, on in (("karras", self.use_karras_sigmas), ("exponential", self.use_exponential_sigmas),
                                 ("beta", self.use_beta_sigmas)) if on]
        if len(kinds) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        return kinds[0] if kinds else None


KNOWN_KEYS = frozenset(f.name for f in fields(SchedulerConfig)) | frozenset(UNSUPPORTED_FLAGS)


def _normalise(key: str, value: Any) -> Any:
    """Lists from JSON become tuples so the config stays immutable."""
    if key == "trained_betas" and value is not None:
        return tuple(float(v) for v in value)
    if key == "disable_corrector":
        return tuple(int(v) for v in (value or ()))
    return value


def resolve(defaults: Mapping[str, Any], config: Mapping[str, Any],
            *overrides: Mapping[str, Any], class_name: str = "scheduler",
            supported: frozenset = frozenset()) -> SchedulerConfig:
    """Class defaults, then the keys of `config` the class accepts, then each overrides mapping in turn.

    `supported`: the UNSUPPORTED_FLAGS this class does implement (flow matching's use_dynamic_shifting)."""
    skipped = set(config.get("_use_default_values", ()))
    values = dict(defaults)
    layers = [{k: v for k, v in config.items() if k not in skipped}, *overrides]
    for layer in layers:
        for key, value in layer.items():
            if key in defaults:
                values[key] = value
    for flag in set(UNSUPPORTED_FLAGS) - supported:
        if values.pop(flag, None):
            raise ValueError(f"{class_name}: {flag} is not supported by this runtime")
    return SchedulerConfig(**{k: _normalise(k, v) for k, v in values.items()})
