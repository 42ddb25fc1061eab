"""Target profiles: data files under profiles/, loaded into frozen dataclasses and validated."""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.errors import UserError

from .quantize import check_int8, int8_settings
from .specs import COMPONENT_NAMES

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
PRECISIONS = ("fp32", "fp16")
LEVELS = ("disabled", "basic", "extended", "all")
AXES = ("batch", "height", "width")
SEQUENCE = (77, 77, 231)      # optional shapes.sequence: text tokens, 1 to 3 CLIP chunks of 77 (A1111 long prompts)
TRT_SHAPES = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
PROVIDER_OPTIONS = Path(__file__).parent / "data" / "provider_options.json"
SESSION_KEYS = {    # [session]: what the runtime reads into onnxruntime SessionOptions, with the allowed values
    "intra_op_num_threads": int, "inter_op_num_threads": int, "execution_mode": ("sequential", "parallel"),
    "graph_optimization_level": LEVELS, "enable_mem_pattern": bool,
    "enable_cpu_mem_arena": bool, "graph_cache": str}


@dataclass(frozen=True)
class ShapeRange:
    """An axis's [min, opt, max]."""
    min: int
    opt: int
    max: int

    def as_list(self) -> list:
        """The [min, opt, max] list the manifest stores."""
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """Everything target-specific about an export, as data."""
    name: str
    description: str
    provider: str
    opset: int
    precision: str
    shapes: dict                      # axis -> ShapeRange
    fusions: dict                     # FusionOptions attribute -> bool; "enabled" switches the optimizer
    session: dict
    provider_options: dict
    preoptimize: str = "disabled"     # offline pre-optimisation level at export (CPU provider only: portable)
    keep_fp32: tuple = ()             # components left fully fp32 on an fp16 target
    fp32_ops: tuple = ()              # op types kept fp32 inside fp16 graphs
    quantize_unet: bool = False       # dynamic int8 UNet (the older spelling of int8.mode = "dynamic")
    multihead_self_attention: bool = False   # fused self-attention as MultiHeadAttention (sdexport.cpu_attention)
    int8: dict = field(default_factory=dict)   # [int8]: mode off/dynamic/static and its settings (sdexport.quantize)
    io_binding: bool = False
    cuda_graph: bool = False          # CUDA graph capture/replay per static shape (needs io_binding)
    free_dimension_overrides: bool = False
    fallback_providers: tuple = ()
    source: str = ""
    hash: str = field(default="", compare=False)

    def component_precision(self, component: str) -> str:
        """The precision one component is exported in."""
        return "fp32" if component in self.keep_fp32 else self.precision

    @property
    def fusion_enabled(self) -> bool:
        """Whether the onnxruntime transformers optimizer runs at all."""
        return bool(self.fusions.get("enabled", False))


_SCALARS = {
    "name": str, "description": str, "provider": str, "opset": int, "precision": str,
    "preoptimize": str, "quantize_unet": bool, "io_binding": bool, "cuda_graph": bool,
    "free_dimension_overrides": bool, "multihead_self_attention": bool,
}
_LISTS = ("keep_fp32", "fp32_ops", "fallback_providers")
_TABLES = ("shapes", "fusions", "session", "provider_options", "int8")


def profile_names() -> list[str]:
    """Names of the profiles shipped with the project."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a user's own profile file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.exists():
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(f"unknown target or profile {name_or_path!r}; known: {', '.join(profile_names())} "
                            "(or pass --profile path/to/file.toml)")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path}: not a valid TOML profile ({e})") from None
    profile = profile_from_dict(data, where=str(path))
    return replace(profile, source=str(path), hash=hashlib.sha256(raw).hexdigest())


def profile_from_dict(data: dict, where: str = "profile") -> Profile:
    """Validate a parsed profile and build the Profile."""
    unknown = set(data) - set(_SCALARS) - set(_LISTS) - set(_TABLES)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("name", "description", "provider", "opset", "precision", "shapes"):
        if key not in data:
            raise UserError(f"{where}: missing required key {key!r}")
    for key, typ in _SCALARS.items():
        if key in data and not isinstance(data[key], typ):
            raise UserError(f"{where}: {key} must be a {typ.__name__}, got {data[key]!r}")
    if data["precision"] not in PRECISIONS:
        raise UserError(f"{where}: precision must be one of {PRECISIONS}, got {data['precision']!r}")
    if data.get("preoptimize", "disabled") not in LEVELS:
        raise UserError(f"{where}: preoptimize must be one of {LEVELS}")
    if data.get("preoptimize", "disabled") != "disabled" and data["provider"] != "CPUExecutionProvider":
        raise UserError(f"{where}: preoptimize runs onnxruntime's CPU provider at export, so it only applies to "
                        f"provider CPUExecutionProvider (set it to \"disabled\" for {data['provider']})")
    bad = set(data.get("keep_fp32", ())) - set(COMPONENT_NAMES)
    if bad:
        raise UserError(f"{where}: keep_fp32 names unknown component(s) {sorted(bad)}; known: {COMPONENT_NAMES}")
    _check_fusions(data.get("fusions", {}), where)
    _check_session(data.get("session", {}), where)
    _check_provider_options(data, where)
    check_int8(data.get("int8", {}), where)
    fields = {k: data[k] for k in _SCALARS if k in data}
    fields |= {k: tuple(data.get(k, ())) for k in _LISTS}
    fields |= {k: dict(data.get(k, {})) for k in _TABLES}
    fields["shapes"] = parse_shape_table(data["shapes"], where)
    return Profile(**fields)


def _fusion_switches() -> set:
    """The boolean attributes of onnxruntime's FusionOptions (a misspelt switch would be silently ignored)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    return {k for k, v in vars(FusionOptions("unet")).items() if isinstance(v, bool)}


def _check_fusions(fusions: dict, where: str) -> None:
    """Fusion keys must be FusionOptions attributes with boolean values."""
    switches = _fusion_switches() if set(fusions) - {"enabled"} else set()
    for key, value in fusions.items():
        if not isinstance(value, bool):
            raise UserError(f"{where}: fusions.{key} must be true or false")
        if key != "enabled" and key not in switches:
            raise UserError(f"{where}: fusions.{key} is not a fusion switch (known: {', '.join(sorted(switches))})")


def _check_session(session: dict, where: str) -> None:
    """[session] keys must be ones the runtime applies, with values of the right kind."""
    for key, value in session.items():
        if key not in SESSION_KEYS:
            raise UserError(f"{where}: session.{key} is not a session setting (known: {', '.join(SESSION_KEYS)})")
        allowed = SESSION_KEYS[key]
        if isinstance(allowed, tuple) and value not in allowed:
            raise UserError(f"{where}: session.{key} must be one of {allowed}, got {value!r}")
        if isinstance(allowed, type) and (not isinstance(value, allowed) or (allowed is int and isinstance(value, bool))):
            raise UserError(f"{where}: session.{key} must be a {allowed.__name__}, got {value!r}")


def _check_provider_options(data: dict, where: str) -> None:
    """[provider_options] keys must be options onnxruntime documents for the profile's provider."""
    known = json.loads(PROVIDER_OPTIONS.read_text())
    if data["provider"] not in known:
        raise UserError(f"{where}: unknown provider {data['provider']!r} (known: "
                        f"{', '.join(k for k in known if not k.startswith('_'))})")
    for key in data.get("provider_options", {}):
        if key not in known[data["provider"]]:
            raise UserError(f"{where}: provider_options.{key} is not an option of {data['provider']} "
                            f"(known: {', '.join(known[data['provider']]) or 'none'})")


def parse_shape_table(table: dict, where: str) -> dict:
    """Validate {axis: [min, opt, max]}; height and width must be multiples of 8, the optional sequence of 77."""
    if not set(AXES) <= set(table) <= {*AXES, "sequence"}:
        raise UserError(f"{where}: shapes must define exactly {', '.join(AXES)} (and optionally sequence)")
    out = {}
    for axis in [a for a in (*AXES, "sequence") if a in table]:
        rng = table[axis]
        if (not isinstance(rng, list) or len(rng) != 3 or not all(isinstance(v, int) and v > 0 for v in rng)
                or not rng[0] <= rng[1] <= rng[2]):
            raise UserError(f"{where}: shapes.{axis} must be [min, opt, max] positive integers, got {rng!r}")
        if axis in ("height", "width") and any(v % 8 for v in rng):
            raise UserError(f"{where}: shapes.{axis} values must be multiples of 8, got {rng!r}")
        if axis == "sequence" and any(v % 77 for v in rng):
            raise UserError(f"{where}: shapes.sequence values must be multiples of 77 (CLIP chunks), got {rng!r}")
        out[axis] = ShapeRange(*rng)
    return out


_SHAPE_ITEM = re.compile(r"^(\d+)x(\d+)@(\d+)(?:-(\d+))?$")


def parse_shapes_option(text: str) -> dict:
    """`512x512@1,768x768@1-4` -> shape ranges covering every entry; the first entry is the optimum."""
    entries = []
    for item in text.split(","):
        m = _SHAPE_ITEM.match(item.strip())
        if not m:
            raise UserError(f"--shapes: {item.strip()!r} is not WIDTHxHEIGHT@BATCH or WIDTHxHEIGHT@MIN-MAX")
        w, h, b0 = int(m[1]), int(m[2]), int(m[3])
        entries.append((w, h, b0, int(m[4]) if m[4] else b0))
    w0, h0, b0, _ = entries[0]
    table = {
        "width": [min(e[0] for e in entries), w0, max(e[0] for e in entries)],
        "height": [min(e[1] for e in entries), h0, max(e[1] for e in entries)],
        "batch": [min(e[2] for e in entries), b0, max(e[3] for e in entries)],
    }
    return parse_shape_table(table, "--shapes")


def with_shapes(profile: Profile, shapes: dict) -> Profile:
    """The profile with its shape ranges replaced (e.g. by --shapes); a sequence range it has is kept."""
    return replace(profile, shapes={k: v for k, v in profile.shapes.items() if k not in shapes} | shapes)


def tensorrt_shapes(profile: Profile, spec, configs: dict) -> dict:
    """TensorRT's explicit optimisation profile of one graph, {"trt_profile_min_shapes": "input_ids:1x77,...", ...}:
    every dynamic input at the profile's min / opt / max sizes. UNet-type graphs take both guidance halves at once
    and 77 * n text states; text encoders take rows of at most their position table (77: prompts go in chunks)."""
    from .specs import DYNAMIC, concrete_shape, dims

    ranges = {"sequence": ShapeRange(*SEQUENCE)} | profile.shapes
    halves = 2 if spec.model_type == "unet" else 1
    rows = configs[spec.module].get("max_position_embeddings", SEQUENCE[0]) if spec.is_text else None
    out = {}
    for option, pick in zip(TRT_SHAPES, ("min", "opt", "max")):
        at = {axis: getattr(r, pick) for axis, r in ranges.items()}
        batch = at["batch"] * (1 if pick == "min" else halves)
        sequence = min(at["sequence"], rows) if rows else at["sequence"]
        d = dims(configs, batch, at["height"], at["width"], sequence)
        out[option] = ",".join(f"{t.name}:{'x'.join(str(n) for n in concrete_shape(t, d))}" for t in spec.inputs
                               if any(x in DYNAMIC for x in t.shape))
    return out


def graph_provider_options(profile: Profile, spec, configs: dict) -> dict:
    """Options one graph's session adds to the profile's: TensorRT gets that graph's optimisation profile."""
    return tensorrt_shapes(profile, spec, configs) if profile.provider == "TensorrtExecutionProvider" else {}


def describe(profile: Profile) -> str:
    """A human-readable multi-line summary of a profile."""
    lines = [f"{profile.name}: {profile.description}", f"  file        {profile.source}",
             f"  provider    {profile.provider}" + (f" (fallback {', '.join(profile.fallback_providers)})"
                                                    if profile.fallback_providers else ""),
             f"  precision   {profile.precision}" + (f", fp32 kept for {', '.join(profile.keep_fp32)}"
                                                    if profile.keep_fp32 else ""),
             f"  opset       {profile.opset}", f"  preoptimise {profile.preoptimize}"
             + (", fusions: " + ", ".join(k for k, v in profile.fusions.items() if v and k != "enabled")
                if profile.fusion_enabled else ", fusions off")]
    for axis, r in profile.shapes.items():
        lines.append(f"  {axis:<11} min {r.min}, opt {r.opt}, max {r.max}")
    int8 = int8_settings(profile)
    if int8.mode != "off":
        graphs = ", ".join(int8.graphs) if int8.mode == "static" else "unet"
        lines.append(f"  int8        {int8.mode} quantisation of {graphs}")
    return "\n".join(lines)
