"""The `runtime` command line: parse, build the request, call the pipeline. Torch-free."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from .cliutil import FriendlyGroup, debug_option
from .errors import UserError
from .cli_a1111 import apply_png_parameters, inpaint_options, outpaint_request, restore_original, sampler_scheduler
from .cli_lora import configure as configure_loras, lora_options, parse_loras, register as register_loras
from .cli_sd3 import CLI_STEPS, family_defaults, sd3_options, sd3_run_options
from .request import DEFAULTS, PROMPT_SYNTAXES, SD3_DEFAULTS, STRENGTH


@click.group(cls=FriendlyGroup)
@debug_option
def main():
    """Generate images from exported Stable Diffusion folders with onnxruntime (no PyTorch)."""


def _parse_seed(text: str | None, count: int):
    """`42` -> 42 (one generator for the batch), `1,2,3` -> per-image seeds, none -> a random seed."""
    if text is None:
        return int.from_bytes(os.urandom(4), "little")
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seed must be an integer or a comma-separated list of integers, got {text!r}") from None
    if len(seeds) == 1:
        return seeds[0]
    if len(seeds) != count:
        raise UserError(f"--seed lists {len(seeds)} seeds for {count} images; give one per image or a single seed")
    return seeds


def _valid_text(text: str | None, flag: str) -> str | None:
    """Text safe to encode as UTF-8 (see repair_surrogates), with a warning when argv held undecodable bytes."""
    from .tokenizer import repair_surrogates

    if text is None:
        return None
    fixed = repair_surrogates(text)
    if fixed != text:
        click.echo(f"warning: {flag} is not valid UTF-8; the undecodable bytes were replaced by U+FFFD", err=True)
    return fixed


def _load_latents(path: str | None):
    """--latents FILE.npy."""
    if path is None:
        return None
    import numpy as np
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--latents {path}: cannot read a .npy array ({e})") from None


FILLS = ("fill", "original", "latent-noise", "latent-nothing")    # A1111's inpainting_fill 0..3
@main.command()
@click.option("--model", required=True, type=click.Path(), help="An exported model folder.")
@click.option("--prompt", default=None, help="What to draw (required unless --from-png gives it).")
@click.option("--from-png", type=click.Path(), default=None,
              help="Take prompt, sampler, steps, CFG, seed, size and clip skip from an AUTOMATIC1111 PNG; "
              "options given win.")
@click.option("--negative-prompt", default=None, help="What to avoid.")
@click.option("--prompt-syntax", type=click.Choice(PROMPT_SYNTAXES), default=DEFAULTS["prompt_syntax"],
              show_default=True, help="plain: literal, as diffusers (77 tokens); a1111: (weights:1.2), BREAK, "
              "long prompts, as AUTOMATIC1111.")
@click.option("--clip-skip", type=int, default=DEFAULTS["clip_skip"], show_default=True,
              help="A1111 'Clip skip' (SD 1.x/2.x): text states from the N-th layer from the end (diffusers' "
              "clip_skip = N - 1); plain syntax applies it to the prompt only, as diffusers; ignored for SDXL.")
@click.option("--steps", default=None, type=int, help=f"Denoising steps [default: {CLI_STEPS}; SD3: "
              f"{SD3_DEFAULTS['num_inference_steps']}, as diffusers].")
@click.option("--guidance", default=None, type=float, help=f"Classifier-free guidance scale [default: "
              f"{DEFAULTS['guidance_scale']}; SD3: {SD3_DEFAULTS['guidance_scale']}].")
@click.option("--seed", default=None, help="Integer seed (torch-compatible noise) or one per image: 1,2,3.")
@click.option("--generator", "gen_kind", type=click.Choice(["torch", "numpy"]), default="torch", show_default=True,
              help="Noise source: bit-exact with torch's CPU generator, or NumPy's.")
@click.option("--scheduler", default=None, help="Scheduler name (see `runtime schedulers`); default: the folder's.")
@click.option("--width", type=int, default=None, help="Image width (multiple of 8).")
@click.option("--height", type=int, default=None, help="Image height (multiple of 8).")
@click.option("--batch", default=DEFAULTS["num_images_per_prompt"], show_default=True, type=int,
              help="Images per prompt.")
@click.option("--init-image", type=click.Path(), default=None, help="img2img / inpainting source image.")
@click.option("--strength", type=float, default=None,
              help=f"img2img strength in [0, 1] (default {STRENGTH['img2img']}; {STRENGTH['inpaint']} with --mask).")
@click.option("--mask", type=click.Path(), default=None, help="Inpainting mask (white = repaint).")
@click.option("--mask-blur", type=float, default=4, show_default=True, help="A1111 mask blur (Gaussian sigma, px).")
@click.option("--inpaint-full-res", is_flag=True, help="A1111 'only masked': repaint a crop around the mask.")
@click.option("--inpaint-padding", type=int, default=0, show_default=True, help="Pixels kept around that crop.")
@click.option("--inpainting-fill", type=click.Choice(FILLS), default=FILLS[0], show_default=True,
              help="What the masked area starts from, as A1111's 'masked content'.")
@click.option("--invert-mask", is_flag=True, help="Repaint the black area of the mask instead of the white.")
@click.option("--outpaint", default=None, metavar="L,T,R,B",
              help="Extend --init-image by these pixels (multiples of 8) on each side and paint the new area.")
@click.option("--latents", type=click.Path(), default=None, help="Initial latents as .npy (N, 4, H/8, W/8).")
@click.option("--control-image", multiple=True, type=click.Path(), help="ControlNet condition image (edges, depth, "
              "pose ...), resized to the generation size; repeat for each exported ControlNet, in order.")
@click.option("--control-scale", multiple=True, type=float, help="ControlNet conditioning scale, one for all or one "
              "per --control-image (default as diffusers: 1.0; 0.8 with --init-image; 0.5 with --mask, SDXL 1.0).")
@click.option("--control-start", multiple=True, type=float, help="Fraction of the steps before ControlNet applies (0.0).")
@click.option("--control-end", multiple=True, type=float, help="Fraction of the steps after which it stops (1.0).")
@click.option("--guess-mode", is_flag=True, help="ControlNet on the conditional half only (diffusers' guess_mode).")
@click.option("--provider", default="auto", show_default=True,
              help="auto, cpu, cuda, tensorrt, directml or openvino (the OpenVINO runtime).")
@click.option("--threads", default=0, type=int, help="Intra-op threads (0 = the runtime's default).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="OpenVINO inference precision (default: the profile's, else OpenVINO's choice).")
@click.option("--vae-tiling", is_flag=True, help="Decode in overlapping tiles (large images in less memory).")
@click.option("--vae-tile-size", default=512, show_default=True, type=int, help="Tile size in pixels for --vae-tiling.")
@click.option("--no-verify", is_flag=True, help="Skip the SHA-256 check of the graph files.")
@click.option("--out", required=True, type=click.Path(), help="Output .png (several get -1, -2 ...) or .npy.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@lora_options
@click.option("--embeddings", type=click.Path(), default=None, metavar="DIR",
              help="Folder of textual-inversion embeddings (.safetensors); a file's name is its prompt word.")
@sd3_options
@debug_option
@click.pass_context
def generate(ctx, **values):
    """Generate images from a prompt (txt2img, img2img with --init-image, inpainting with --mask)."""
    if values["from_png"]:
        apply_png_parameters(ctx, values["from_png"], values)
    if values["prompt"] is None:
        raise UserError("--prompt is required (or --from-png with a prompt in its parameters)")
    _generate(ctx, values, **values)


def _generate(ctx, values, model, prompt, negative_prompt, prompt_syntax, steps, guidance, seed, gen_kind,
              scheduler, width, height, batch, init_image, strength, mask, latents, provider, threads, no_verify,
              out, quiet, outpaint, precision, vae_tiling, vae_tile_size, **_):
    """generate, once the PNG's values are merged in."""
    from dataclasses import replace

    from .atomic import check_writable_parent
    from .control import cli_units
    from .embeddings import use_folder as use_embeddings
    from .images import open_image
    from .model import open_model
    from .pipeline import pipeline_for
    from .request import GenerationRequest

    out = Path(out)
    if out.suffix.lower() not in (".png", ".npy"):
        raise UserError(f"--out must end in .png or .npy, got {out.name!r}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .png or .npy")
    check_writable_parent(out)
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"{name} must be a positive multiple of 8, got {value}")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    image = open_image(init_image, "--init-image") if init_image else None
    mask_image = open_image(mask, "--mask") if mask else None
    if mask_image is not None and image is not None and mask_image.size != image.size:
        raise UserError(f"--mask is {mask_image.size[0]}x{mask_image.size[1]} but --init-image is "
                        f"{image.size[0]}x{image.size[1]}; they must be the same size")
    grown = outpaint_request(outpaint, image, values) if outpaint is not None else None
    if grown is not None:
        image, mask_image = grown
    sampler_scheduler(scheduler, None)                   # an unknown PNG sampler fails before the model loads
    seed_value = _parse_seed(seed, batch)
    sd3 = sd3_run_options(values, model, _valid_text)    # SD3 folders only: refused before the model loads
    steps, guidance = family_defaults(model, steps, guidance)
    request = GenerationRequest.create(
        _valid_text(prompt, "--prompt"), negative_prompt=_valid_text(negative_prompt, "--negative-prompt"),
        height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=batch,
        seed=seed_value, generator_kind=gen_kind, latents=_load_latents(latents), image=image,
        mask_image=mask_image, strength=strength, scheduler=None if isinstance(scheduler, tuple) else scheduler,
        output_type="np", prompt_syntax=prompt_syntax, inpaint=inpaint_options(ctx, values),
        clip_skip=values["clip_skip"], guess_mode=values["guess_mode"], controls=cli_units(values),
        loras=parse_loras(values["lora"]))
    pipe = pipeline_for(open_model(Path(model), provider=provider, threads=threads, verify=not no_verify,
                                   precision=precision, one_shot=True))   # SD3 folders: runtime.sd3_pipeline
    configure_loras(pipe, values["lora_dir"], values["lora_partial"])
    use_embeddings(pipe, values["embeddings"])
    if vae_tiling:
        pipe.vae_tiling = _tiling(vae_tile_size, pipe.model.facts.vae_scale_factor)
    if isinstance(scheduler, tuple):
        request = replace(request, scheduler=sampler_scheduler(scheduler, pipe.model))
    result = _run_reporting(pipe, request, quiet, **sd3)
    images = result.images if grown is None else restore_original(result.images, grown)
    _write(out, images, request, result.sampler, model)


def _tiling(pixels: int, factor: int):
    """--vae-tiling with --vae-tile-size in pixels, as latent cells."""
    from .vae_tiling import VaeTiling

    if pixels <= 0 or pixels % factor:
        raise UserError(f"--vae-tile-size must be a positive multiple of {factor} pixels, got {pixels}")
    return VaeTiling(tile=pixels // factor)


def _run_reporting(pipe, request, quiet: bool, **options):
    """pipe.run with a progress bar, and each Python warning (e.g. prompt truncation) as one `warning:` line."""
    bar = None if quiet else _ProgressBar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            result = pipe.run(request, callback=bar, **options)
        except BaseException:
            if bar is not None:
                bar.close(failed=True)
            raise
        finally:
            for w in caught:
                click.echo(f"warning: {str(w.message).splitlines()[0] if str(w.message) else w.category.__name__}",
                           err=True)
    return result


class _ProgressBar:
    """A tqdm bar on stderr, drawn from the first finished step on: nothing is drawn for work that never runs."""

    def __init__(self):
        self.bar = None

    def __call__(self, step, total, t, latents):
        """The pipeline's step callback."""
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="denoising", unit="step", leave=False)
        self.bar.update(1)
        if step == total:
            self.close()

    def close(self, failed: bool = False) -> None:
        """Remove the bar (if drawn), so that what follows (an error) starts on its own line, in a log file too."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if failed and not click.get_text_stream("stderr").isatty():
                click.echo("", err=True)


def _write(out: Path, images, request, sampler: tuple, model) -> None:
    """Write .npy, or PNGs with AUTOMATIC1111-style parameters; sampler: (A1111 sampler, schedule type)."""
    from .images import a1111_parameters, output_paths, save_npy, save_png, syntax_fields, to_uint8

    if out.suffix.lower() == ".npy":
        save_npy(out, images)
        click.echo(f"wrote {out} {tuple(images.shape)}")
        return
    seed, paths = request.seed, output_paths(out, len(images))
    noted = syntax_fields((request.prompt[0], request.negative_prompt or ""), request.prompt_syntax)
    if request.image is not None:
        noted["Denoising strength"] = request.effective_strength
    if request.clip_skip > 1:                               # A1111 writes it only when it is not 1
        noted["Clip skip"] = request.clip_skip
        if request.prompt_syntax == "plain":                # A1111 would skip layers on the negative prompt too
            noted.setdefault("Prompt syntax", "plain")
    for i, (path, img) in enumerate(zip(paths, to_uint8(images))):
        params = a1111_parameters(request.prompt[0], request.negative_prompt or "", request.num_inference_steps,
                                  sampler, request.guidance_scale,
                                  seed[i] if isinstance(seed, tuple) else seed, img.shape[1], img.shape[0],
                                  Path(model).name, noted)
        save_png(path, img, params)
        click.echo(f"wrote {path}")


@main.command()
@click.argument("folder", type=click.Path())
@debug_option
def info(folder):
    """Describe an exported model FOLDER."""
    from .info import describe_folder

    click.echo(describe_folder(Path(folder)))


@main.command()
@debug_option
def schedulers():
    """List the scheduler names --scheduler accepts."""
    from .schedulers import describe, scheduler_names

    for name in scheduler_names():
        click.echo(f"{name:<16} {describe(name)}")


from .cli_serve import serve  # noqa: E402  (the command's module imports the serve extra only when it runs)

main.add_command(serve)
register_loras(main)
