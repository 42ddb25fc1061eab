"""Caches of machine-specific compiled graphs: where they go, and onnxruntime's fully optimised CPU graphs.

onnxruntime spends most of a CPU session's creation on graph transformations (fusions, the NCHWc layout pass at
level "all": about 13 s of the full-size SD 1.5 UNet's 15 s). Their result depends on the graph, the onnxruntime
version, the CPU and any pinned dimensions, not on the request, so the first session saves it
(`optimized_model_filepath`, as onnxruntime documents for offline optimisation) and later ones load that graph with
the transformations off. Like OpenVINO's CACHE_DIR, the cache sits in the model folder when it is writable, else
under the user cache. An entry is a folder written under a temporary name and renamed into place, so a reader
never sees half of one; graphs with replaced initializers (merged LoRA weights) are not cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DATA = "model.onnx_data"


def cache_location(folder: Path, wanted: str, kind: str) -> str:
    """`wanted` inside the model folder when writable, else the user cache's `kind` folder; '' disables."""
    if not wanted:
        return ""
    if os.access(folder, os.W_OK):
        return str(folder / wanted)
    base = os.environ.get("SDEXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdexport")
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return os.path.join(base, kind, f"{folder.name}-{tag}")


def _cpu_flags() -> str:
    """The CPU's model and flags: an optimised graph may use kernels (NCHWc block sizes) only this CPU has."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "|".join(dict.fromkeys(v.strip() for k, _, v in (ln.partition(":") for ln in lines)
                                  if k.strip() in wanted))


@dataclass(frozen=True)
class Entry:
    """One cached graph: `folder/<file>` (+ its data) once written."""
    folder: Path
    file: str = "model.onnx"

    @property
    def model(self) -> Path:
        return self.folder / self.file

    @property
    def ready(self) -> bool:
        return (self.folder / "done").is_file()

    def staging(self) -> Path:
        """A private folder the first session writes into (renamed into place by `commit`)."""
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path) -> bool:
        """Move a written staging folder into place; False (and nothing kept) when it is incomplete or taken."""
        try:
            if not (tmp / self.file).is_file():
                return False
            (tmp / "done").write_text("")
            os.rename(tmp, self.folder)                # atomic; fails when another process got there first
            return True
        except OSError:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def drop(self) -> None:
        """Remove an entry that failed to load (the next session rebuilds it)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def keyed(path: Path, where: str, key: list, file: str = "model.onnx") -> Entry:
    """The entry under `where` for one graph file (its path, size and mtime, data file included) and `key`."""
    files = [f for f in (path, path.with_name(DATA)) if f.is_file()]
    identity = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    digest = hashlib.sha256(json.dumps([identity, *key]).encode()).hexdigest()[:16]
    return Entry(Path(where) / f"{path.parent.name}-{digest}", file)


def entry(path: Path, wanted: str, level: str, dims: dict | None) -> Entry | None:
    """The cache entry of one graph file at `level` with `dims` pinned, or None when caching is off."""
    import onnxruntime as ort

    where = cache_location(path.parent.parent, wanted, "onnxruntime")
    if not where or level == "disabled":
        return None
    return keyed(path, where, [ort.__version__, _cpu_flags(), level, sorted((dims or {}).items())])


def save_options(opts, tmp: Path) -> None:
    """Session options that make onnxruntime write the optimised graph into `tmp` (weights in one data file)."""
    opts.optimized_model_filepath = str(tmp / "model.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
