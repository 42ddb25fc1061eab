"""The LoRA options of `runtime generate` (--lora, --lora-dir, --lora-partial) and the `runtime loras` command."""
from __future__ import annotations

import click

from .errors import UserError


def lora_options(f):
    """Add --lora FILE[:WEIGHT] (repeatable), --lora-dir DIR and --lora-partial to a command."""
    f = click.option("--lora-partial", is_flag=True,
                     help="Apply the layers of a LoRA that match this model even when some do not.")(f)
    f = click.option("--lora-dir", type=click.Path(), default=None,
                     help="Folder of LoRA files named by <lora:name:weight> prompt tags (and by --lora NAME).")(f)
    return click.option("--lora", "lora", multiple=True, metavar="FILE[:WEIGHT]",
                        help="Merge a LoRA file (.safetensors, kohya or PEFT) with this weight (default 1.0); "
                             "repeat for several.")(f)


def parse_loras(values) -> tuple:
    """The --lora values as ((file, weight), ...)."""
    from .lora.library import parse_lora_option

    return tuple(parse_lora_option(v) for v in values)


def configure(pipe, lora_dir, partial: bool) -> None:
    """Give the pipeline the LoRA folder that prompt tags name files in, and the partial-match switch."""
    pipe.lora_dir, pipe.lora_partial = lora_dir, partial


def register(main) -> None:
    """Add `runtime loras DIR` to the command group."""
    from .cliutil import debug_option

    @main.command()
    @click.argument("folder", type=click.Path())
    @click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON (as /sdapi/v1/loras).")
    @debug_option
    def loras(folder, as_json):
        """List the LoRA files in FOLDER: name, format, rank, layers, components."""
        from .lora.library import list_loras

        items = list_loras(folder)
        if as_json:
            import json
            click.echo(json.dumps(items, indent=2, default=str))
            return
        if not items:
            raise UserError(f"{folder}: no .safetensors LoRA files")
        click.echo(f"{'name':<28} {'format':<7} {'rank':>5} {'layers':>6}  components")
        for i in items:
            if "error" in i:
                click.echo(f"{i['name']:<28} error: {i['error']}")
                continue
            click.echo(f"{i['name']:<28} {i['format']:<7} {str(i['rank']):>5} {i['layers']:>6}  "
                       f"{', '.join(i['components'])}")
