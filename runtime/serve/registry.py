"""The models a server offers: exported folders found under --model, one loaded pipeline, switching.

As A1111 with its default `sd_checkpoints_limit` of 1, one model is loaded at a time: switching (POST
/sdapi/v1/options, or a request's override_settings.sd_model_checkpoint) loads the new one and drops the old,
which jobs already running on it keep until they finish. Model names follow A1111's /sdapi/v1/sd-models: the
folder name is `model_name`, `title` adds the short hash, and any of title, name, short hash or SHA-256 selects it.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..layout import TEXT_ENCODERS
from ..manifest import Manifest, read_manifest
from ..model import ModelFacts, read_facts
from .errors import FieldError

GRAPHS = tuple(e for e, _ in TEXT_ENCODERS) + ("unet", "vae_encoder", "vae_decoder")   # built at load time


@dataclass(frozen=True)
class ModelEntry:
    """One exported folder the server can load."""
    name: str
    folder: Path
    manifest: Manifest | None
    facts: ModelFacts

    @property
    def sha256(self) -> str | None:
        """A digest of the folder's recorded file hashes (None without sdexport.json: nothing is hashed at start)."""
        if self.manifest is None:
            return None
        lines = "\n".join(f"{path} {rec['sha256']}" for path, rec in sorted(self.manifest.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def short_hash(self) -> str | None:
        """A1111's short hash: the first 10 hex digits."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """A1111's checkpoint title: `name [shorthash]`."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    def item(self) -> dict:
        """The entry as A1111's SDModelItem."""
        return {"title": self.title, "model_name": self.name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": str(self.folder), "config": None}

    def matches(self, text: str) -> bool:
        """Whether an A1111 checkpoint reference (title, name, short hash or SHA-256) names this entry."""
        text = text.strip()
        return text in (self.title, self.name, self.short_hash, self.sha256) or text.removesuffix(".onnx") == self.name

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Refuse sizes outside the exported ranges before a request takes a place in the queue."""
        if self.manifest is not None:
            self.manifest.check_shape(batch, height, width)


def is_model_folder(folder: Path) -> bool:
    """An exported Stable Diffusion folder (ours or Optimum's) has unet/model.onnx."""
    return (folder / "unet" / "model.onnx").is_file()


def discover(root: Path) -> list[ModelEntry]:
    """ROOT itself when it is an exported folder, else its subfolders that are, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--model {root}: no such folder")
    folders = [root] if is_model_folder(root) else sorted(p for p in root.iterdir() if p.is_dir() and
                                                         is_model_folder(p))
    if not folders:
        raise UserError(f"--model {root}: neither an exported model folder (with unet/model.onnx) nor a folder "
                        "of them")
    return [ModelEntry(f.name, f, read_manifest(f), read_facts(f)) for f in folders]


class ModelRegistry:
    """The offered entries, the current one, and the one loaded pipeline (thread-safe)."""

    def __init__(self, root: Path, provider: str = "auto", threads: int = 0, verify: bool = True,
                 lora_dir: Path | None = None, embeddings_dir: Path | None = None):
        self.entries = discover(root)
        self.provider, self.threads, self.verify, self.lora_dir = provider, threads, verify, lora_dir
        self.embeddings_dir = embeddings_dir          # textual-inversion files prompts name (runtime.embeddings)
        self._current = self.entries[0]
        self._loaded: tuple | None = None           # (entry, pipeline, run guard)
        self._lock = threading.Lock()
        self.batcher = None                          # runtime.serve.batching: merges concurrent runs when set

    @property
    def current(self) -> ModelEntry:
        """The model requests use unless they name another."""
        return self._current

    def find(self, text) -> ModelEntry:
        """The entry an A1111 checkpoint reference names, or 404 naming sd_model_checkpoint (as A1111)."""
        if isinstance(text, str):
            for entry in self.entries:
                if entry.matches(text):
                    return entry
        titles = ", ".join(e.title for e in self.entries)
        raise FieldError("sd_model_checkpoint", f"model {text!r} not found; available: {titles}", status=404)

    def pipeline(self, entry: ModelEntry | None = None):
        """(pipeline, run guard) for entry (default: the current one), loading it if it is not the loaded one."""
        entry = entry or self._current
        with self._lock:
            if self._loaded is None or self._loaded[0] is not entry:
                self._loaded = None                  # drop the old sessions before building new ones
                self._loaded = (entry, *self._load(entry))
            return self._loaded[1], self._loaded[2]

    def switch(self, text) -> ModelEntry:
        """Make the named model current (loading it now), as A1111's sd_model_checkpoint option does."""
        entry = self.find(text)
        self.pipeline(entry)
        self._current = entry
        return entry

    def loaded(self) -> ModelEntry | None:
        """The entry whose sessions are in memory."""
        loaded = self._loaded
        return loaded[0] if loaded else None

    def _load(self, entry: ModelEntry) -> tuple:
        """Open a folder and build every session now, so that concurrent requests never race to create one."""
        from ..model import open_model
        from ..pipeline import pipeline_for

        pipe = pipeline_for(open_model(entry.folder, provider=self.provider, threads=self.threads, verify=self.verify))
        pipe.lora_dir = self.lora_dir                # <lora:name:w> tags in prompts name files here
        if self.embeddings_dir is not None:
            from ..embeddings import use_folder
            use_folder(pipe, self.embeddings_dir)
        names = tuple(pipe.model.manifest.graphs) if pipe.model.manifest else GRAPHS
        for name in names:
            if pipe.model.has(name):
                pipe.model.graph(name)
        cfg = pipe.model.session_config
        reentrant = cfg.backend == "onnxruntime" and not (cfg.fixed_dims or cfg.fixed_buffers)
        return pipe, contextlib.nullcontext() if reentrant else threading.Lock()


def available_embeddings(registry: ModelRegistry) -> dict:
    """/sdapi/v1/embeddings: the --embeddings-dir files as A1111 lists them for the current model ({"loaded":
    {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {...}: widths that do not fit})."""
    if registry.embeddings_dir is None:
        return {"loaded": {}, "skipped": {}}
    from ..embeddings import list_embeddings

    return list_embeddings(registry.pipeline()[0])


def available_loras(lora_dir: Path | None) -> list[dict]:
    """/sdapi/v1/loras: the LoRA files in --lora-dir as A1111's Lora extension lists them
    ({name, alias, path, metadata}, plus format, rank, layers); [] without --lora-dir."""
    if lora_dir is None:
        return []
    from ..lora import list_loras

    return list_loras(lora_dir)
