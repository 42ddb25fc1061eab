"""The `sdexport.json` manifest: the contract between the exporter and the runtime."""
from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ModelFolderError

MANIFEST_NAME = "sdexport.json"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "int64", "int32")
EDITABLE_CONFIGS = (("model_index.json",), ("scheduler", "scheduler_config.json"), ("*", "config.json"))  # per part


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, element type, shape (ints or symbolic axis names)."""
    name: str
    dtype: str
    shape: tuple

    @staticmethod
    def from_dict(d: dict) -> "TensorInfo":
        """Read and validate one tensor entry."""
        _require(d, ("name", "dtype", "shape"), "tensor")
        if d["dtype"] not in DTYPES:
            raise ModelFolderError(f"manifest: tensor {d['name']!r} has unknown dtype {d['dtype']!r}")
        return TensorInfo(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphInfo:
    """One exported ONNX graph and what it needs to run."""
    name: str
    file: str
    inputs: tuple
    outputs: tuple
    precision: str = "fp32"
    provider: str = "CPUExecutionProvider"
    custom_ops: tuple = ()
    data_file: str | None = None
    weight_map: str | None = None     # <component>/weight_map.json: source weight -> initializer (runtime.lora)
    provider_options: dict = field(default_factory=dict)   # this graph's own options (TensorRT shape profiles)

    @staticmethod
    def from_dict(name: str, d: dict) -> "GraphInfo":
        """Read and validate one graph entry."""
        _require(d, ("file", "inputs", "outputs"), f"graph {name!r}")
        return GraphInfo(
            name=name, file=d["file"], data_file=d.get("data_file"),
            inputs=tuple(TensorInfo.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorInfo.from_dict(t) for t in d["outputs"]),
            precision=d.get("precision", "fp32"), provider=d.get("provider", "CPUExecutionProvider"),
            custom_ops=tuple(d.get("custom_ops", ())), weight_map=d.get("weight_map"),
            provider_options=dict(d.get("provider_options", {})))


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an exported folder."""
    target: str
    precision: str
    shape_ranges: dict          # {"batch"|"height"|"width": [min, opt, max]}, pixels for height/width
    graphs: dict                # name -> GraphInfo
    files: dict                 # relative path -> {"size": int, "sha256": str}
    source: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    session: dict = field(default_factory=dict)
    provider_options: dict = field(default_factory=dict)
    tool_versions: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    sdexport_version: str = ""
    license: str = "unknown"    # the source model's licence id (e.g. "creativeml-openrail-m")

    def to_dict(self) -> dict:
        """The sdexport.json form: exactly what manifest_from_dict reads back."""
        d = asdict(self)
        d["graphs"] = {k: _graph_dict(g) for k, g in self.graphs.items()}
        return d

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Refuse a request outside the exported shape ranges, before any graph runs."""
        for axis, value in (("batch", batch), ("height", height), ("width", width)):
            self.check_axis(axis, value)

    def check_axis(self, axis: str, value: int) -> None:
        """Refuse one value outside its exported range ("batch", "height" or "width")."""
        lo, _, hi = self.shape_ranges.get(axis, (1, 1, 1 << 30))
        if not lo <= value <= hi:
            raise ModelFolderError(
                f"{axis} {value} is outside this model's range [{lo}, {hi}] "
                f"(exported for target {self.target!r}; re-export with --shapes to widen it)")


def _graph_dict(g: GraphInfo) -> dict:
    """A GraphInfo as JSON, tensors as dicts."""
    d = asdict(g)
    d.pop("name")
    d["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in g.inputs]
    d["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in g.outputs]
    d["custom_ops"] = list(g.custom_ops)
    return d


def _require(d: dict, keys: tuple, where: str) -> None:
    """Fail with a message naming the first missing key."""
    if not isinstance(d, dict):
        raise ModelFolderError(f"manifest: {where} must be an object")
    for k in keys:
        if k not in d:
            raise ModelFolderError(f"manifest: {where} is missing {k!r}")


_TYPES = {"format_version": int, "target": str, "precision": str, "shape_ranges": dict, "graphs": dict,
          "files": dict, "source": dict, "profile": dict, "session": dict, "provider_options": dict,
          "tool_versions": dict, "verification": dict, "sdexport_version": str, "license": str}


def manifest_from_dict(d: dict) -> Manifest:
    """Validate a parsed sdexport.json and build the Manifest; any malformed value is a ModelFolderError."""
    _require(d, ("format_version", "target", "precision", "shape_ranges", "graphs", "files"), "sdexport.json")
    if d["format_version"] != FORMAT_VERSION:
        raise ModelFolderError(
            f"manifest format version {d['format_version']!r} is not supported (this runtime reads "
            f"version {FORMAT_VERSION}); re-export the model with a matching sdexport")
    for key, typ in _TYPES.items():
        if key in d and (not isinstance(d[key], typ) or isinstance(d[key], bool)):
            raise ModelFolderError(f"manifest: {key} must be a JSON {typ.__name__}, got {type(d[key]).__name__}")
    try:
        return _build(d)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        raise ModelFolderError(f"manifest: malformed entry ({type(e).__name__}: {e}); re-export the model") from None


def _build(d: dict) -> Manifest:
    """The Manifest from a dict whose top-level types are checked."""
    for rec in d["files"].values():
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            raise ModelFolderError("manifest: every files entry needs an integer size and a sha256 string")
    for axis, rng in d["shape_ranges"].items():
        if not isinstance(rng, list) or len(rng) != 3 or not all(isinstance(v, int) for v in rng) \
                or not rng[0] <= rng[1] <= rng[2]:
            raise ModelFolderError(f"manifest: shape range {axis!r} must be [min, opt, max], got {rng!r}")
    graphs = {name: GraphInfo.from_dict(name, g) for name, g in d["graphs"].items()}
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in d.items() if k in known} | {"graphs": graphs})


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None for a folder without one (e.g. written by Optimum)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not a readable JSON manifest ({e})") from None
    return manifest_from_dict(data)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """The manifest's record of one file: size and SHA-256."""
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def integrity_checked(relpath: str) -> bool:
    """Whether a listed file is checked by size and SHA-256: all but the small JSON configs a user may edit."""
    parts = PurePosixPath(relpath).parts
    return not any(len(parts) == len(p) and all(map(fnmatchcase, parts, p)) for p in EDITABLE_CONFIGS)


def edited_configs(folder: Path, manifest: Manifest) -> list[str]:
    """The listed user-editable configs whose content differs from the export."""
    return [rel for rel, rec in manifest.files.items() if not integrity_checked(rel)
            and (Path(folder) / rel).is_file() and file_record(Path(folder) / rel) != rec]


def check_files(folder: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Fail if a listed file is missing, or a graph or tokenizer file has the wrong size or (with hashes) content."""
    for rel, rec in manifest.files.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise ModelFolderError(f"{folder}: missing file {rel} (incomplete copy?)")
        if not integrity_checked(rel):
            continue
        size = path.stat().st_size
        if size != rec["size"]:
            raise ModelFolderError(f"{path}: size {size} differs from the manifest's {rec['size']} "
                                   "(truncated or half-copied?)")
        if hashes and file_digest(path) != rec["sha256"]:
            raise ModelFolderError(f"{path}: SHA-256 differs from the manifest (corrupted or modified file)")
