"""Where built models are cached, how a cached folder is built once, and quieting the loading libraries."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from runtime.atomic import staged_dir


def cache_dir() -> Path:
    """Where built-in models are materialised (XDG cache, or $SDEXPORT_CACHE)."""
    base = os.environ.get("SDEXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdexport")
    return Path(base)


def cached_folder(dest: Path, build: Callable[[Path], None]) -> Path:
    """`dest`, built by `build(staging_folder)` on first use and swapped in only when complete."""
    if not (dest / "model_index.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with staged_dir(dest, replace_existing=True) as tmp:
            build(tmp)
    return dest


def quiet_libraries() -> None:
    """Silence the loading progress bars and info logs of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
