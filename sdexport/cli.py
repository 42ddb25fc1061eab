"""The `sdexport` command line: parse, build a config, call the library."""
from __future__ import annotations

from pathlib import Path

import click

from runtime.cli import info as runtime_info
from runtime.cliutil import FriendlyGroup, StageLog, debug_option
from runtime.errors import UserError


@click.group(cls=FriendlyGroup)
@debug_option
def main():
    """Export Stable Diffusion models to ONNX folders tuned per deployment target."""


@main.command()
@click.option("--model", required=True, help="Alias (sd-v1-5, ...), a local diffusers folder, or 'tiny'.")
@click.option("--target", default="cpu", show_default=True, help="Target profile: cpu, cuda, tensorrt, directml.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), help="Use this profile file instead of --target.")
@click.option("--shapes", help="Shape ranges, e.g. 512x512@1,768x768@1-4 (overrides the profile's).")
@click.option("--out", required=True, type=click.Path(file_okay=True), help="Output folder (must not exist).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new export succeeded).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison against PyTorch.")
@click.option("--vae", type=click.Path(), help="Use this VAE instead (a vae folder, or a pipeline folder with vae/).")
@click.option("--text-encoder", type=click.Path(), help="Use this text encoder instead (folder, as --vae).")
@click.option("--license", "license_", help="The model's licence, recorded in the manifest (default: from the "
              "model card, the alias table or the checkpoint; 'unknown' if none is found).")
@click.option("--controlnet", "controlnets", multiple=True, help="Also export this ControlNet (a diffusers "
              "ControlNetModel folder or hub repo id); repeat for several: controlnet/, controlnet_1/, ...")
@click.option("--quiet", is_flag=True, help="No progress output.")
@debug_option
def convert(model, target, profile_file, shapes, out, force, no_verify, vae, text_encoder, license_, controlnets,
            quiet):
    """Export, optimise and verify MODEL for one target into --out."""
    from .convert import ConvertConfig, convert as run
    from .profiles import load_profile, parse_shapes_option, with_shapes

    profile = load_profile(profile_file or target)
    if shapes:
        profile = with_shapes(profile, parse_shapes_option(shapes))
    overrides = {"vae": vae, "text_encoder": text_encoder}
    report = run(ConvertConfig(model, profile, Path(out), force=force, verify=not no_verify, overrides=overrides,
                               license=license_, controlnets=controlnets), StageLog(quiet))
    _print_checks(report.checks)
    click.echo(f"wrote {out} (target {profile.name}, licence {report.license})")


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--model", required=True, help="The source model the folder was exported from.")
@click.option("--vae", type=click.Path(), help="The VAE override used at convert time.")
@click.option("--text-encoder", type=click.Path(), help="The text encoder override used at convert time.")
@debug_option
def verify(folder, model, vae, text_encoder):
    """Re-run the PyTorch comparison on an exported FOLDER."""
    from .convert import verify_folder

    checks = verify_folder(Path(folder), model, StageLog(), {"vae": vae, "text_encoder": text_encoder})
    _print_checks(checks)
    bad = [c for c in checks if not c.ok]
    if bad:
        raise UserError(f"{len(bad)} of {len(checks)} check(s) did not pass: " + "; ".join(c.describe() for c in bad))
    click.echo(f"all {len(checks)} checks of {len({c.component for c in checks})} graphs match PyTorch")


main.add_command(runtime_info, "info")   # one `info` for both CLIs: the manifest in human form


@main.command()
@click.argument("name", required=False)
@debug_option
def profiles(name):
    """List the target profiles, or show one in full."""
    from .profiles import describe, load_profile, profile_names

    for n in [name] if name else profile_names():
        click.echo(describe(load_profile(n)))


def _print_checks(checks) -> None:
    """The verification table: component, shape, max abs error, limit."""
    if checks:
        click.echo(f"{'component':<16}{'stage':<11}{'shape':<12}{'max abs err':>12}{'limit':>12}{'PSNR dB':>9}  result")
    for c in checks:
        if not c.ran:
            click.echo(f"{c.component:<16}{c.stage:<11}{'-':<12}{'':>12}{'':>12}{'':>9}  NOT RUN: {c.not_run}")
            continue
        p = f"{c.psnr_db:9.1f}" if c.psnr_db is not None and c.psnr_db != float("inf") else f"{'inf':>9}"
        click.echo(f"{c.component:<16}{c.stage:<11}{c.shape:<12}{c.max_abs:>12.2e}{c.limit:>12.2e}{p}  "
                   f"{'ok' if c.ok else 'FAIL'}")
