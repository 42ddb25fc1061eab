"""The scheduler interface: pure functions of an immutable plan and state.

A `Scheduler` holds only its configuration and training tables. `plan(n)` gives the
timesteps and sigmas of an n-step run, `init_state(plan)` the solver history, and
`step` returns the next sample with a new state; nothing is mutated, so one scheduler
can drive any number of runs at once. Randomness comes in through a `noise(shape)`
callable, called exactly where diffusers calls `randn_tensor` in its `step`.

Every `step` does the same three things: turn the model output into (x0, eps) at the
noise level of step i (`parameterization.predict`, the one place that handles
epsilon / v / sample), clip or threshold x0, then apply the scheduler's update rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from . import schedules
from .config import SchedulerConfig
from .parameterization import NoiseLevel, postprocess_x0, predict

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]
F32 = np.float32

# Keys every diffusers scheduler accepts; classes add their own.
COMMON_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "steps_offset": 0,
}


@dataclass(frozen=True, eq=False)
class Plan:
    """An n-step schedule: UNet timesteps, sigmas (sigma-based schedulers) and the initial noise scale."""

    timesteps: np.ndarray
    sigmas: np.ndarray | None
    init_noise_sigma: float
    num_inference_steps: int


@dataclass(frozen=True)
class NoState:
    """State of a scheduler that keeps no history."""


def _f64(a: np.ndarray) -> np.ndarray:
    """Float64 working copy of an input array."""
    return np.asarray(a, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Scheduler:
    """Base scheduler; subclasses give the schedule (`_plan`), noise level and update rule."""

    config: SchedulerConfig
    name: str
    alphas_cumprod: np.ndarray = field(init=False, repr=False)

    order: ClassVar[int] = 1
    diffusers_name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = COMMON_DEFAULTS
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    clamp_terminal: ClassVar[bool] = False  # diffusers sets alpha_bar[-1] = 2**-24 under zero SNR
    postprocesses_x0: ClassVar[bool] = True  # clip_sample / thresholding applied to x0 (TCD ignores them)
    supported_flags: ClassVar[frozenset] = frozenset()  # config.UNSUPPORTED_FLAGS this class implements

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in self.prediction_types:
            raise ValueError(f"{self.diffusers_name}: prediction_type {cfg.prediction_type!r} is not "
                             f"supported; use one of {', '.join(self.prediction_types)}")
        self._validate()
        betas = schedules.betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start,
                                cfg.beta_end, cfg.trained_betas)
        ac = schedules.alphas_cumprod(betas, zero_snr=cfg.rescale_betas_zero_snr,
                                      clamp_terminal=self.clamp_terminal)
        object.__setattr__(self, "alphas_cumprod", ac)

    def _validate(self) -> None:
        """Reject options this scheduler does not implement."""
        if self.config.timestep_spacing not in schedules.SPACINGS:
            raise ValueError(f"timestep_spacing {self.config.timestep_spacing!r} is not supported; "
                             f"use one of {', '.join(schedules.SPACINGS)}")
        if self.config.sigma_schedule not in (None, *schedules.SIGMA_SCHEDULES):  # raises on two flags set
            raise ValueError(f"sigma schedule {self.config.sigma_schedule!r} is not supported")

    @property
    def stochastic(self) -> bool:
        """True if `step` draws noise."""
        return False

    # -- schedule -----------------------------------------------------------------
    def plan(self, num_inference_steps: int, **options: Any) -> Plan:
        """The timesteps and sigmas of a num_inference_steps run (diffusers' set_timesteps; options: its extra
        arguments, e.g. flow matching's mu)."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {n}")
        if n > self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps "
                             f"({self.config.num_train_timesteps})")
        return self._plan(int(n), **options)

    def _plan(self, n: int) -> Plan:
        raise NotImplementedError

    def init_state(self, plan: Plan) -> Any:
        """Solver history at the first step of a run (any start index)."""
        return NoState()

    def noise_level(self, plan: Plan, i: int) -> NoiseLevel:
        """Noise level of the sample at plan.timesteps[i]."""
        return NoiseLevel.vp(self.alphas_cumprod[int(plan.timesteps[i])])

    def model_noise_level(self, plan: Plan, i: int) -> NoiseLevel:
        """Noise level the model sees at step i (differs from noise_level only at DPM2's midpoints)."""
        return self.noise_level(plan, i)

    def final_alpha_cumprod(self) -> float:
        """alpha_bar used past t = 0: 1 with set_alpha_to_one, else alpha_bar_0."""
        return 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    # -- sampling -----------------------------------------------------------------
    def scale_model_input(self, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
        """The UNet input at step i (the sample itself unless the scheduler rescales it)."""
        return np.asarray(sample, dtype=F32)

    def step(self, plan: Plan, state: Any, i: int, model_output: np.ndarray, sample: np.ndarray,
             noise: NoiseFn | None = None) -> tuple[np.ndarray, Any]:
        """Sample at step i + 1 and the new state, from the model output at step i."""
        if self.stochastic and noise is None:
            raise ValueError(f"{self.name} is stochastic: step() needs a noise(shape) callable")
        x = _f64(sample)
        x0, eps = predict(self.config.prediction_type, _f64(model_output), x, self.model_noise_level(plan, i))
        if self.postprocesses_x0:
            x0 = postprocess_x0(x0, self.config)
        with np.errstate(divide="ignore", invalid="ignore"):  # inf / nan propagate silently, as in torch
            prev, state = self._update(plan, state, i, x, x0, eps, noise)
        return np.asarray(prev, dtype=F32), state

    def _update(self, plan: Plan, state: Any, i: int, x: np.ndarray, x0: np.ndarray,
                eps: np.ndarray, noise: NoiseFn | None) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def add_noise(self, plan: Plan, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Noise clean latents to the level of plan.timesteps[i]: alpha * x0 + sigma * noise."""
        level = self.noise_level(plan, i)
        return np.asarray(level.alpha * _f64(original) + level.sigma * _f64(noise), dtype=F32)

    def img2img_start(self, plan: Plan, strength: float) -> int:
        """First step index of img2img, as StableDiffusionImg2ImgPipeline.get_timesteps."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = plan.num_inference_steps
        init_timestep = min(int(n * strength), n)
        return max(n - init_timestep, 0) * self.order


def check_range(timesteps: np.ndarray, cfg) -> np.ndarray:
    """Timesteps that index the training tables must lie in [0, num_train_timesteps)."""
    if timesteps.max() >= cfg.num_train_timesteps or timesteps.min() < 0:
        raise ValueError(f"timestep {int(timesteps.max())} is outside the {cfg.num_train_timesteps} training "
                         f"timesteps (steps_offset {cfg.steps_offset} with {len(timesteps)} steps); "
                         "use fewer steps or another timestep_spacing")
    return timesteps


def draw(noise: NoiseFn, shape: tuple[int, ...]) -> np.ndarray:
    """One call of the caller's noise source, as float64."""
    return _f64(noise(tuple(shape)))
