"""The SD3 options of `runtime generate`: a prompt per text encoder and T5's token count, as diffusers'
StableDiffusion3Pipeline takes them (prompt_2 / prompt_3 and their negatives default to the prompt and the
negative prompt; max_sequence_length 256, at most 512)."""
from __future__ import annotations

from pathlib import Path

import click

from .errors import UserError
from .request import DEFAULTS, SD3_DEFAULTS

CLI_STEPS = 25                   # `runtime generate`'s steps when none are given (SD 1.x/2.x/SDXL)

SD3_TEXTS = (("prompt_2", "CLIP-G (text_encoder_2)", "--prompt"), ("prompt_3", "T5 (text_encoder_3)", "--prompt"),
             ("negative_prompt_2", "CLIP-G", "--negative-prompt"), ("negative_prompt_3", "T5", "--negative-prompt"))


def _flag(name: str) -> str:
    """The option spelling of a parameter name: prompt_2 -> --prompt-2."""
    return "--" + name.replace("_", "-")


def sd3_options(f):
    """Add --prompt-2, --prompt-3, --negative-prompt-2, --negative-prompt-3 and --max-sequence-length."""
    f = click.option("--max-sequence-length", type=int, default=None,
                     help="SD3: T5 tokens of the prompt (default 256, at most 512).")(f)
    for name, encoder, fallback in reversed(SD3_TEXTS):
        f = click.option(_flag(name), name, default=None,
                         help=f"SD3: the {fallback[2:].replace('-', ' ')} for {encoder} (default: {fallback}).")(f)
    return f


def sd3_run_options(values: dict, folder, valid_text) -> dict:
    """{"prompts": SD3Prompts} for the SD3 pipeline's run when any SD3 option is given, else {}; refused in one line
    for a folder that is not SD3 (the options would be ignored). valid_text(text, flag) repairs argv text."""
    given = [name for name, *_ in SD3_TEXTS if values.get(name) is not None]
    given += ["max_sequence_length"] if values.get("max_sequence_length") is not None else []
    if not given:
        return {}
    if Path(folder).is_dir() and not _is_sd3(folder):
        raise UserError(f"{', '.join(_flag(n) for n in given)} apply to SD3 models (a transformer/ graph); "
                        f"{folder} is not one")
    from .sd3_conditioning import T5_LENGTH, SD3Prompts

    texts = {name: valid_text(values.get(name), _flag(name)) for name, *_ in SD3_TEXTS}
    length = values.get("max_sequence_length")
    return {"prompts": SD3Prompts(**texts, max_sequence_length=T5_LENGTH if length is None else length)}


def family_defaults(model, steps, guidance) -> tuple:
    """Steps and guidance not given: ours for SD 1.x/2.x/SDXL, diffusers' StableDiffusion3Pipeline's for SD3."""
    family = SD3_DEFAULTS if _is_sd3(model) else {"num_inference_steps": CLI_STEPS, "guidance_scale": DEFAULTS["guidance_scale"]}
    return (family["num_inference_steps"] if steps is None else steps,
            family["guidance_scale"] if guidance is None else guidance)


def _is_sd3(folder) -> bool:
    """Whether a model folder is an SD3 export (a transformer/ graph, runtime.sd3_pipeline)."""
    from .model import denoiser_name

    return Path(folder).is_dir() and denoiser_name(Path(folder)) == "transformer"
