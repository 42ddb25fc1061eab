"""The /sdapi/v1 request bodies: AUTOMATIC1111's field names, types and defaults (one table: these classes).

Reference: AUTOMATIC1111/stable-diffusion-webui modules/api/models.py, which builds
StableDiffusionTxt2ImgProcessingAPI / ...Img2ImgProcessingAPI from the __init__ fields of
modules/processing.py's StableDiffusionProcessing(Txt2Img|Img2Img) plus sampler_index, script_name,
script_args, send_images, save_images, alwayson_scripts, force_task_id and infotext. Unknown fields are ignored
as pydantic does there; a null value means the field's default here (A1111 passes None on and may fail later).
Which of these fields we apply, ignore at neutral values or refuse is decided in a1111_plan.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N_ITER = 100            # A1111's UI slider maximum for "Batch count"


class _Base(BaseModel):
    """Fields of StableDiffusionProcessing that the API exposes, with A1111's defaults."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """Clients send null for "not set" (webuiapi's hr_checkpoint_name=None, ...): use the default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, le=MAX_N_ITER)
    steps: int = 50
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, allow_inf_nan=False)
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Base):
    """StableDiffusionTxt2ImgProcessingAPI."""
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Base):
    """StableDiffusionImg2ImgProcessingAPI."""
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = Field(0.75, allow_inf_nan=False)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    """PNGInfoRequest."""
    image: str


class OpenAIImageRequest(BaseModel):
    """OpenAI's POST /v1/images/generations body (the fields that apply to a diffusion model)."""
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
