"""ControlNet at run time: control units, control images, per-step scales, and the residuals the UNet adds.

References: diffusers StableDiffusionControlNetPipeline / ...Img2ImgPipeline / ...InpaintPipeline and
StableDiffusionXLControlNetPipeline (prepare_image, controlnet_keep, guess mode: ControlNet on the conditional half
only, zero residuals for the unconditional half), MultiControlNetModel (residuals summed, scale 0 skipped),
ControlNetModel.forward (guess mode's logspace(-1, 0) per-residual scales); Zhang et al. 2023, "Adding Conditional
Control to Text-to-Image Diffusion Models". The exported ControlNet graphs give unscaled residuals; scaling and
summing happen here, in float32 as diffusers does.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError

CONTROLLED_UNET = "unet_controlled"
# controlnet_conditioning_scale defaults per mode, as each diffusers ControlNet pipeline's (SDXL inpainting: 1.0)
DEFAULT_SCALE = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5}
SDXL_DEFAULT_SCALE = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}


def controlnet_graph(index: int) -> str:
    """Folder of the index-th exported ControlNet: controlnet, controlnet_1, ... (sdexport.specs.controlnet_name)."""
    return "controlnet" if index == 0 else f"controlnet_{index}"


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet's part in a request: its condition image and when and how strongly it applies."""
    image: object                  # PIL image or (H, W, C) array: the condition (edges, depth, pose ...), as given
    scale: float | None = None     # controlnet_conditioning_scale; None: the mode's default (DEFAULT_SCALE)
    start: float = 0.0             # control_guidance_start: fraction of the steps before it applies
    end: float = 1.0               # control_guidance_end: fraction of the steps after which it stops
    model: str | None = None       # graph folder (controlnet, controlnet_1, ...); None: by position in the request


def control_units(control_image, scale=None, start=None, end=None) -> tuple:
    """diffusers-style arguments (one value, or a list with one per ControlNet) -> a tuple of ControlUnit."""
    if control_image is None:
        if any(v is not None for v in (scale, start, end)):
            raise UserError("controlnet_conditioning_scale / control_guidance_start / end need a control_image")
        return ()
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    values = {}
    for name, value, default in (("controlnet_conditioning_scale", scale, None),
                                 ("control_guidance_start", start, 0.0), ("control_guidance_end", end, 1.0)):
        value = default if value is None else value
        value = list(value) if isinstance(value, (list, tuple)) else [value] * len(images)
        if len(value) != len(images):
            raise UserError(f"{name} has {len(value)} values for {len(images)} control images")
        values[name] = value
    return tuple(ControlUnit(img, s, a, b) for img, s, a, b in zip(images, *values.values()))


def check_units(units: tuple, guess_mode) -> None:
    """Every unit has an image, a finite scale and 0 <= start < end <= 1 (diffusers' check_inputs)."""
    if not isinstance(guess_mode, bool):
        raise UserError(f"guess_mode must be true or false, got {guess_mode!r}")
    if not isinstance(units, tuple) or not all(isinstance(u, ControlUnit) for u in units):
        raise UserError("controls must be a tuple of runtime.control.ControlUnit (see control_units)")
    for i, u in enumerate(units):
        where = f"control unit {i + 1}"
        if u.image is None:
            raise UserError(f"{where} has no control image")
        for name in ("scale", "start", "end"):
            value = getattr(u, name)
            if name == "scale" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}: {name} must be a finite number, got {value!r}")
        if not 0.0 <= u.start < u.end <= 1.0:
            raise UserError(f"{where}: control guidance start {u.start} and end {u.end} must satisfy "
                            "0 <= start < end <= 1")
        if u.model is not None and not re.fullmatch(r"controlnet(_\d+)?", str(u.model)):
            raise UserError(f"{where}: model must name a ControlNet graph (controlnet, controlnet_1, ...), "
                            f"got {u.model!r}")


def keep(step: int, steps: int, start: float, end: float) -> float:
    """diffusers' controlnet_keep: 1 while step i of n lies inside [start, end] as fractions of the steps, else 0."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


def preprocess_control(image, width: int, height: int) -> np.ndarray:
    """diffusers' control image processor: RGB, Lanczos-resized to the generation size, [0, 1]: (1, 3, H, W)."""
    from PIL import Image

    from .images import to_pil

    im = to_pil(image).convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(im).astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def controlnet_names(model) -> list:
    """The folder's ControlNet graphs in export order."""
    names = []
    while model.has(controlnet_graph(len(names))):
        names.append(controlnet_graph(len(names)))
    return names


def prepare(model, request, passes: list, cfg: bool, size: tuple, steps: int):
    """The request's Control, or None without control images."""
    if not request.controls:
        return None
    return Control(model, request.controls, request.guess_mode, passes, cfg, size, steps, request.mode)


class Control:
    """The ControlNets of one request: images at the generation size, schedules, and the residuals per UNet call."""

    def __init__(self, model, units: tuple, guess_mode: bool, passes: list, cfg: bool, size: tuple, steps: int,
                 mode: str = "txt2img"):
        # passes: the UNet feeds per call (Conditioning.passes(), host arrays); cfg: guidance doubles the batch;
        # size: (height, width) of the generation; steps: denoising steps this request runs
        available = controlnet_names(model)
        if not available:
            raise UserError(f"{model.folder} was exported without ControlNet; a control image needs a folder from "
                            "`sdexport convert --controlnet ...`")
        if not model.has(CONTROLLED_UNET):
            raise UserError(f"{model.folder}: has ControlNets but no {CONTROLLED_UNET}/ graph; re-export it")
        names = [u.model or controlnet_graph(i) for i, u in enumerate(units)]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UserError(f"{len(units)} control images for {len(available)} ControlNet(s) in this folder "
                            f"({', '.join(available)}); no {', '.join(unknown)}")
        self.model, self.units, self.names, self.steps, self.passes, self.cfg = model, units, names, steps, passes, cfg
        self.images = [preprocess_control(u.image, size[1], size[0]) for u in units]      # (1, 3, H, W) each
        pooled = [_config(model, n).get("global_pool_conditions", False) for n in names[:1]]
        self.guess_mode = bool(guess_mode or any(pooled))          # diffusers: the first ControlNet's setting
        sdxl = "text_embeds" in model.graph(names[0]).inputs
        self.default_scale = (SDXL_DEFAULT_SCALE if sdxl else DEFAULT_SCALE)[mode]

    def scales(self, step: int) -> list:
        """Each unit's conditioning scale at step `step` (0-based from the first denoising step)."""
        return [(self.default_scale if u.scale is None else u.scale) * keep(step, self.steps, u.start, u.end)
                for u in self.units]

    def at(self, step: int):
        """The residuals function of one denoising step (0-based): (x, t, pass index, pass count) -> feeds or None."""
        return lambda x, t, index, count: self.residuals(step, x, t, index, count)

    def residuals(self, step: int, x: np.ndarray, t: float, index: int, count: int) -> dict | None:
        """Residual inputs of unet_controlled for one UNet call on latents x (pass `index` of `count`), or None
        when no ControlNet applies to this call (the plain UNet runs: adding zero residuals changes nothing)."""
        if self.guess_mode and count == 2 and index == 0:
            return None                                                   # split passes: the unconditional one
        half = self.guess_mode and self.cfg and count == 1               # one (2B) call: its conditional half
        rows = slice(len(x) // 2, None) if half else slice(None)
        out = self._sum(x[rows], t, {k: v[rows] for k, v in self.passes[index].items()}, self.scales(step))
        if out is not None and half:
            out = {k: np.concatenate([np.zeros_like(v), v]) for k, v in out.items()}     # (2B, C, h', w')
        return out

    def _sum(self, x: np.ndarray, t: float, feeds: dict, scales: list):
        """Scaled residuals of every active ControlNet, summed; None when none is active this step."""
        total = None
        for name, image, scale in zip(self.names, self.images, scales):
            if scale == 0.0:                                              # as MultiControlNetModel: skipped
                continue
            out = self._run(name, x, t, feeds, image)
            factors = _factors(len(out), scale, self.guess_mode)
            scaled = {k: (v * f).astype(np.float32) for (k, v), f in zip(out.items(), factors)}
            total = scaled if total is None else {k: total[k] + v for k, v in scaled.items()}
        return total

    def _run(self, name: str, x: np.ndarray, t: float, feeds: dict, image: np.ndarray) -> dict:
        """One ControlNet graph on latents (b, C, h, w) and its condition image repeated to b rows."""
        g = self.model.graph(name)
        ts = np.float32(t) if g.input_rank("timestep") == 0 else np.full((len(x),), t, dtype=np.float32)
        inputs = {"sample": x, "timestep": ts, "controlnet_cond": np.repeat(image, len(x), axis=0)}
        inputs |= {k: v for k, v in feeds.items() if k in g.inputs}
        return g(**{k: g.cast(k, v) for k, v in inputs.items()})


def _factors(count: int, scale: float, guess_mode: bool) -> np.ndarray:
    """Per-residual scales: `scale` for each, or in guess mode scale * logspace(-1, 0) from the first to the mid."""
    if guess_mode:
        return np.logspace(-1, 0, count).astype(np.float32) * np.float32(scale)
    return np.full(count, scale, dtype=np.float32)


def _config(model, name: str) -> dict:
    """A ControlNet graph's source config.json (empty when absent)."""
    path = model.folder / name / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def a1111_units(args, decode=None) -> tuple:
    """AUTOMATIC1111's ControlNet extension payload (`alwayson_scripts.controlnet.args`) -> control units.

    Entry i drives the folder's i-th ControlNet (controlnet, controlnet_1, ...); entries with `enabled` false are
    skipped. `image` (or the older `input_image`, or {"image": ...}) must already be the condition map: module
    "none". `decode(text, field)` turns a base64 string into an image (the server's decoder, with its limits).
    Only control_mode Balanced matches diffusers; resize_mode is always "Just Resize" (diffusers' resize).
    """
    if not isinstance(args, (list, tuple)):
        raise UserError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for i, arg in enumerate(args):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(arg, dict):
            raise UserError(f"{field} must be an object")
        if not arg.get("enabled", True):
            continue
        image = arg.get("image", arg.get("input_image"))
        image = image.get("image") if isinstance(image, dict) else image
        if image is None or image == "":
            raise UserError(f"{field}: no image (send the preprocessed control image)")
        module = arg.get("module", "none")
        if module not in (None, "", "none", "None"):
            raise UserError(f"{field}: preprocessor {module!r} is not run here; send the preprocessed image with "
                            "module 'none'")
        if arg.get("control_mode", 0) not in (0, "Balanced"):
            raise UserError(f"{field}: control_mode {arg['control_mode']!r} is not supported (only Balanced)")
        if isinstance(image, str):
            if decode is None:
                raise UserError(f"{field}: image is a string but no decoder was given")
            image = decode(image, f"{field}.image")
        values = [_a1111_number(arg, key, default, field) for key, default in
                  (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0))]
        units.append(ControlUnit(image, *values, model=controlnet_graph(i)))
    return tuple(units)


def _a1111_number(arg: dict, key: str, default: float, field: str) -> float:
    """A numeric field of an A1111 ControlNet unit, or a one-line error naming it."""
    value = arg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{field}.{key} must be a number, got {value!r}")
    return float(value)


def cli_units(values: dict) -> tuple:
    """`runtime generate`'s --control-image/--control-scale/--control-start/--control-end -> control units."""
    from .images import open_image

    paths = values.get("control_image") or ()
    options = {k: values.get(k) or () for k in ("control_scale", "control_start", "control_end")}
    if not paths:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v]
        if given or values.get("guess_mode"):
            raise UserError(f"{', '.join(given) or '--guess-mode'} needs --control-image")
        return ()
    for key, v in options.items():
        if len(v) not in (0, 1, len(paths)):
            raise UserError(f"--{key.replace('_', '-')} is given {len(v)} times for {len(paths)} --control-image; "
                            "give it once (for all) or once per image")
    spread = {k: (list(v) * len(paths) if len(v) == 1 else list(v)) or None for k, v in options.items()}
    images = [open_image(p, "--control-image") for p in paths]
    return control_units(images, spread["control_scale"], spread["control_start"], spread["control_end"])
