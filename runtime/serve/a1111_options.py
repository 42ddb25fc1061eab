"""A1111's settings (/sdapi/v1/options, a request's override_settings) as far as they exist here.

Reference: A1111 modules/shared_options.py (names and defaults), modules/api/api.py get_config / set_config,
modules/processing.py process_images (override_settings applied for one request). Two settings act here:
sd_model_checkpoint (which model) and CLIP_stop_at_last_layers (Clip skip). The others are listed at the only
value this runtime implements; setting one to another value would change the image, so it is refused with 422
naming it. Settings this server does not know (UI layout, file saving, ...) are accepted and ignored.
"""
from __future__ import annotations

import threading

from .errors import FieldError

FIXED = {                         # A1111 setting -> the value this runtime implements
    "sd_vae": "Automatic", "sd_checkpoints_limit": 1, "randn_source": "CPU", "eta_noise_seed_delta": 0,
    "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0,
    "initial_noise_multiplier": 1.0, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "inpainting_mask_weight": 1.0, "token_merging_ratio": 0.0, "emphasis": "Original",
    "use_old_emphasis_implementation": False, "comma_padding_backtrack": 20, "samples_format": "png",
    "enable_pnginfo": True, "live_previews_enable": True, "show_progress_type": "Approx cheap",
    "face_restoration": False, "tiling": False,
}
SAME = {"sd_vae": ("Automatic", "None", None), "randn_source": ("CPU",)}   # other spellings of the fixed value


def _fixed_ok(key: str, value) -> bool:
    """Whether value is the one this runtime implements for a FIXED setting."""
    if key in SAME:
        return value in SAME[key]
    expected = FIXED[key]
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(expected)
    return value == expected


def clip_skip_value(value, field: str) -> int:
    """A valid CLIP_stop_at_last_layers (an integer >= 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise FieldError(field, f"must be an integer >= 1 (1 = the last layer), got {value!r}")
    return int(value)


class A1111Options:
    """The server-wide settings POST /sdapi/v1/options changes; the model itself lives in the registry."""

    def __init__(self, registry):
        self.registry = registry
        self.clip_skip = 1
        self._lock = threading.Lock()

    def values(self) -> dict:
        """GET /sdapi/v1/options."""
        current = self.registry.current
        return FIXED | {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256,
                        "CLIP_stop_at_last_layers": self.clip_skip}

    def check(self, settings: dict, where: str) -> dict:
        """The settings that act ({sd_model_checkpoint?, CLIP_stop_at_last_layers?}), refusing fixed ones changed."""
        if not isinstance(settings, dict):
            raise FieldError(where or "body", "settings must be a JSON object")
        acting = {}
        for key, value in settings.items():
            field = f"{where}.{key}" if where else key
            if key == "sd_model_checkpoint":
                acting[key] = self.registry.find(value)
            elif key == "CLIP_stop_at_last_layers":
                acting[key] = clip_skip_value(value, field)
            elif key in FIXED and not _fixed_ok(key, value):
                raise FieldError(field, f"{value!r} is not supported here (it would change the image); "
                                        f"this runtime implements {FIXED[key]!r}")
        return acting

    def apply(self, settings: dict) -> None:
        """POST /sdapi/v1/options: switch the model (loading it now) and store Clip skip."""
        acting = self.check(settings, "")
        with self._lock:
            if "sd_model_checkpoint" in acting:
                self.registry.switch(acting["sd_model_checkpoint"].name)
            self.clip_skip = acting.get("CLIP_stop_at_last_layers", self.clip_skip)
