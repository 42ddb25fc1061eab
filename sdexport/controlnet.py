"""ControlNet sources for `sdexport convert --controlnet`: resolve, load, and check each one against the base model.

Each ControlNet becomes its own graph (controlnet/, controlnet_1/, ... in --controlnet order) and the model gains a
second UNet graph, unet_controlled/, that takes their residuals as inputs; the specs are in sdexport.specs
(controlnet_specs). Reference: diffusers ControlNetModel (Zhang et al. 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models"); its residuals must match the UNet's skip connections one for one.
"""
from __future__ import annotations

import re
from pathlib import Path

from runtime.errors import UserError

from .sources import Components, _download, _load, _read_config
from .specs import controlnet_name, residual_tensors

CLASS = "diffusers.ControlNetModel"
HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "README.md")
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
SINGLE_FILE = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


def resolve_controlnet(spec: str) -> Path:
    """A --controlnet value (a diffusers ControlNetModel folder, or a hub repo id in the local cache) -> its folder."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE:
            raise UserError(f"--controlnet {spec}: single-file ControlNet checkpoints are not supported; convert it "
                            "with diffusers (ControlNetModel.from_single_file(...).save_pretrained(DIR)) and pass DIR")
        raise UserError(f"--controlnet {spec} is a file, not a diffusers ControlNetModel folder")
    if not path.exists():
        if not REPO_ID.fullmatch(spec):
            raise UserError(f"--controlnet {spec!r} is neither an existing folder nor a Hugging Face repo id")
        path = _download(spec, HUB_FILES, "--controlnet")
    for folder in (path, path / "controlnet"):          # the model folder itself, or a pipeline folder holding it
        if (folder / "config.json").is_file():
            _check_class(folder, spec)
            return folder.resolve()
    raise UserError(f"--controlnet {spec}: no config.json there or in controlnet/ below it")


def _check_class(folder: Path, spec: str) -> None:
    """Refuse configs of other model classes (a UNet, ControlNet-XS, ControlNet-Union ...)."""
    cls = _read_config(folder).get("_class_name") or "model without a _class_name"
    if cls != "ControlNetModel":
        raise UserError(f"--controlnet {spec}: {folder / 'config.json'} describes a {cls}, "
                        "not a diffusers ControlNetModel")


def check_compatible(spec: str, controlnet: dict, configs: dict) -> None:
    """A ControlNet must be built for this base: cross-attention width, added conditioning, latents, residuals."""
    unet = configs["unet"]
    width, ours = controlnet.get("cross_attention_dim"), unet.get("cross_attention_dim")
    if width != ours:
        raise UserError(f"--controlnet {spec}: cross-attention width {width} but this model's UNet has {ours}; "
                        "the ControlNet was built for another base model (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)")
    kinds = controlnet.get("addition_embed_type"), unet.get("addition_embed_type")
    if kinds[0] != kinds[1]:
        raise UserError(f"--controlnet {spec}: added conditioning {kinds[0]!r} but this model's UNet uses "
                        f"{kinds[1]!r}; the ControlNet was built for another base model")
    latents = configs["vae"]["latent_channels"]
    if controlnet.get("in_channels") != latents:
        raise UserError(f"--controlnet {spec}: takes {controlnet.get('in_channels')}-channel latents, this model's "
                        f"VAE makes {latents}")
    theirs = [t.shape[1:] for t in residual_tensors(controlnet)]
    wanted = [t.shape[1:] for t in residual_tensors(unet)]
    if theirs != wanted:
        raise UserError(f"--controlnet {spec}: its {len(theirs)} residuals do not fit this UNet's {len(wanted)} skip "
                        f"connections (block_out_channels {controlnet.get('block_out_channels')} vs "
                        f"{unet.get('block_out_channels')}); the ControlNet was built for another base model")


def attach_controlnets(components: Components, specs) -> Components:
    """Load each --controlnet (in order) into `components` as controlnet, controlnet_1, ... after checking it."""
    start = sum(1 for k in components.configs if re.fullmatch(r"controlnet(_\d+)?", k))
    for i, spec in enumerate(specs or ()):
        name = controlnet_name(start + i)
        folder = resolve_controlnet(str(spec))
        config = _read_config(folder)
        check_compatible(str(spec), config, components.configs)
        components.modules[name] = _load(CLASS, folder, f"ControlNet {spec}")
        components.configs[name] = config
        components.controlnets[name] = {"spec": str(spec), "folder": str(folder)}
    return components


def manifest_entries(components: Components) -> list:
    """The manifest's list of ControlNets: graph, what --controlnet named, its folder, its condition channels."""
    return [{"graph": name, **src, "conditioning_channels": components.configs[name].get("conditioning_channels", 3),
             "global_pool_conditions": bool(components.configs[name].get("global_pool_conditions", False))}
            for name, src in components.controlnets.items()]


def recorded_sources(source: dict) -> list:
    """The --controlnet values a manifest's source entry recorded (folders first, as they were resolved)."""
    return [entry.get("folder") or entry["spec"] for entry in source.get("controlnets", [])]
