"""What both CLIs share: one-line errors, Ctrl-C handling, stage progress on stderr."""
from __future__ import annotations

import time
import traceback

import click

from .errors import UserError

EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPT = 2, 1, 130
DEBUG_KEY = "runtime.debug"


class FriendlyGroup(click.Group):
    """A click group that turns failures into one line on stderr (a traceback only with --debug)."""

    def invoke(self, ctx):
        """Run the command; map errors to exit codes."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(EXIT_INTERRUPT)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USER)
        except Exception as e:
            if ctx.meta.get(DEBUG_KEY):
                traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _set_debug(ctx, param, value):
    """Record --debug in the context chain's shared meta (also right when run in-process, not from sys.argv)."""
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def debug_option(f):
    """--debug: show tracebacks (read by FriendlyGroup)."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the full traceback on errors.")(f)


class StageLog:
    """A progress callback that prints each stage with the elapsed time on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, stage: str) -> None:
        """Report one stage."""
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:7.1f}s] {stage}", err=True)
