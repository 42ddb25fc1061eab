"""One declarative spec per exported component: every fact about it, in one place.

A spec says which source module it wraps and how that module is loaded (class, tokenizer folder), its graph
inputs/outputs with dynamic axes, the torch adapter that traces it, the onnxruntime optimizer's model type,
the sample cases it is verified at and its tolerance. Every other table (profiles' component names, loaders,
optimizer types) derives from `component_specs` / `BASE`. Reference: Optimum's OnnxConfig / UNetOnnxConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from runtime.layout import TEXT_ENCODERS, vae_scale_factor

from . import adapters

# Symbolic axis names. Concrete values come from `dims()`: the requested sizes plus the model's configs.
BATCH, SEQ, HEIGHT, WIDTH, LH, LW = "batch", "sequence", "height", "width", "latent_height", "latent_width"
DYNAMIC = (BATCH, SEQ, HEIGHT, WIDTH, LH, LW)
CLIP_LENGTH = 77                     # CLIP's context: one A1111 chunk is 75 tokens + BOS/EOS


@dataclass(frozen=True)
class Tensor:
    """A graph input or output; shape entries are ints, axis names, or config keys resolved by dims()."""
    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class ComponentSpec:
    """How one pipeline component is loaded, traced, optimised and checked."""
    name: str                 # folder in the exported layout
    module: str               # the source pipeline's component folder it wraps: text_encoder | unet | vae ...
    source_class: str         # "package.Class" that loads `module` from a diffusers folder
    adapter: Callable         # (spec, torch module) -> torch module taking `inputs` in order (sdexport.adapters)
    model_type: str           # onnxruntime transformers optimizer's model type: clip | unet | vae
    inputs: tuple
    outputs: tuple
    atol: float = 1e-4        # verification: max abs error <= atol + rtol * max |reference|
    rtol: float = 1e-4
    tokenizer: str | None = None   # tokenizer folder copied beside a text encoder

    @property
    def dynamic_axes(self) -> dict:
        """{tensor name: {axis index: axis name}} for the symbolic axes."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if d in DYNAMIC}
                for t in self.inputs + self.outputs if any(d in DYNAMIC for d in t.shape)}

    @property
    def is_text(self) -> bool:
        """Whether the graph takes token ids (its sample cases vary batch only)."""
        return self.inputs[0].name == "input_ids"

    def sample_cases(self, configs: dict) -> list[tuple[int, int, int, int]]:
        """(batch, height, width, sequence) to trace and verify at: the native size at batch 2, and a smaller odd
        one at batch 1 with two CLIP chunks of text (A1111-style long prompts feed the UNet 154 tokens)."""
        native = configs["unet"]["sample_size"] * vae_scale_factor(configs["vae"])
        step = 8 * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)   # latent sizes the UNet can halve
        small = max(step, (native // 2) // step * step)
        long = CLIP_LENGTH if self.is_text else 2 * CLIP_LENGTH
        return [(2, native, native, CLIP_LENGTH), (1, small, small + step, long)]

    def label(self, d: dict) -> str:
        """A sample case as the verification table prints it, e.g. "2x256x256" or "2x77"."""
        if self.is_text:
            return f"{d[BATCH]}x{d[SEQ]}"
        return f"{d[BATCH]}x{d[HEIGHT]}x{d[WIDTH]}" + (f"@{d[SEQ]}" if d[SEQ] != CLIP_LENGTH else "")

    def sample_inputs(self, d: dict, seed: int = 0) -> dict:
        """Deterministic sample inputs (torch tensors) for one concrete shape."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = concrete_shape(t, d)
            if t.dtype == "int64":           # CLIP BPE vocabularies end with <|startoftext|>, <|endoftext|>
                vocab = d[f"{self.module}_vocab"]
                ids = torch.randint(1, vocab - 2, shape, generator=g)
                ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
                out[t.name] = ids
            elif shape == ():
                out[t.name] = torch.tensor(float(torch.randint(0, 1000, (), generator=g)), dtype=torch.float32)
            elif t.name == "time_ids":                                    # sizes and crop offsets, in pixels
                out[t.name] = torch.randint(0, 1024, shape, generator=g).float()
            else:
                out[t.name] = torch.randn(shape, generator=g, dtype=torch.float32)
        return out


def text_encoder_spec(name: str, layers: int, projection: bool, hidden_states: bool) -> ComponentSpec:
    """A CLIP text encoder: (projected) pooled output, last hidden state, and optionally every layer's states."""
    hidden = f"{name}_hidden"
    seq_out = Tensor("last_hidden_state", "float32", (BATCH, SEQ, hidden))
    pooled = (Tensor("text_embeds", "float32", (BATCH, f"{name}_projection")) if projection
              else Tensor("pooler_output", "float32", (BATCH, hidden)))
    states = tuple(Tensor(f"hidden_states.{i}", "float32", (BATCH, SEQ, hidden)) for i in range(layers + 1))
    outputs = ((pooled, seq_out) if projection else (seq_out, pooled)) + (states if hidden_states else ())
    cls = "transformers.CLIPTextModelWithProjection" if projection else "transformers.CLIPTextModel"
    return ComponentSpec(name, name, cls, adapters.text_encoder, "clip",
                         inputs=(Tensor("input_ids", "int64", (BATCH, SEQ)),), outputs=outputs,
                         tokenizer=dict(TEXT_ENCODERS)[name])


UNET_INPUTS = (Tensor("sample", "float32", (BATCH, "unet_in", LH, LW)),
               Tensor("timestep", "float32", ()),                     # rank-0, as Optimum exports it
               Tensor("encoder_hidden_states", "float32", (BATCH, SEQ, "cross_dim")))
TEXT_TIME_INPUTS = (Tensor("text_embeds", "float32", (BATCH, "pooled_dim")),   # SDXL added conditioning
                    Tensor("time_ids", "float32", (BATCH, "time_ids_dim")))
TIMESTEP_COND = Tensor("timestep_cond", "float32", (BATCH, "time_cond_dim"))   # LCM guidance embedding

UNET = ComponentSpec(
    "unet", "unet", "diffusers.UNet2DConditionModel", adapters.unet, "unet", inputs=UNET_INPUTS,
    outputs=(Tensor("out_sample", "float32", (BATCH, "unet_out", LH, LW)),))
VAE_ENCODER = ComponentSpec(
    "vae_encoder", "vae", "diffusers.AutoencoderKL", adapters.vae_encoder, "vae",
    inputs=(Tensor("sample", "float32", (BATCH, "image_channels", HEIGHT, WIDTH)),),
    outputs=(Tensor("latent_parameters", "float32", (BATCH, "latent_moments", LH, LW)),))  # mean ++ logvar
VAE_DECODER = ComponentSpec(
    "vae_decoder", "vae", "diffusers.AutoencoderKL", adapters.vae_decoder, "vae",
    inputs=(Tensor("latent_sample", "float32", (BATCH, "latent_channels", LH, LW)),),
    outputs=(Tensor("sample", "float32", (BATCH, "image_channels", HEIGHT, WIDTH)),))

# Every component kind, before a model's configs refine it (layer counts, optional UNet inputs).
BASE = (text_encoder_spec("text_encoder", 0, False, False), text_encoder_spec("text_encoder_2", 0, True, False),
        UNET, VAE_ENCODER, VAE_DECODER)
COMPONENT_NAMES = tuple(s.name for s in BASE)


def source_classes() -> dict:
    """{source component folder: "package.Class"} for every component kind."""
    return {s.module: s.source_class for s in BASE}


def unet_spec(unet: dict) -> ComponentSpec:
    """The UNet's inputs follow its config: SDXL text_time conditioning, LCM guidance embedding."""
    extra = TEXT_TIME_INPUTS if unet.get("addition_embed_type") == "text_time" else ()
    extra += (TIMESTEP_COND,) if unet.get("time_cond_proj_dim") else ()
    return replace(UNET, inputs=UNET_INPUTS + extra)


def component_specs(configs: dict) -> tuple:
    """Every graph this model exports, decided by which components and config keys it has."""
    two = "text_encoder_2" in configs    # SDXL-style: both encoders feed their penultimate layer's states
    texts = tuple(text_encoder_spec(name, configs[name]["num_hidden_layers"], projection=name == "text_encoder_2",
                                    hidden_states=two)
                  for name, _ in TEXT_ENCODERS if name in configs)
    return texts + (unet_spec(configs["unet"]), VAE_ENCODER, VAE_DECODER)


def dims(configs: dict, batch: int, height: int, width: int, sequence: int) -> dict:
    """Concrete sizes of every symbolic axis and config key, for one sample shape."""
    unet, vae = configs["unet"], configs["vae"]
    f = vae_scale_factor(vae)
    d = {BATCH: batch, SEQ: sequence, HEIGHT: height, WIDTH: width, LH: height // f, LW: width // f,
         "unet_in": unet["in_channels"], "unet_out": unet["out_channels"], "cross_dim": unet["cross_attention_dim"],
         "image_channels": vae["in_channels"], "latent_channels": vae["latent_channels"],
         "latent_moments": 2 * vae["latent_channels"], "time_cond_dim": unet.get("time_cond_proj_dim")}
    for name, _ in TEXT_ENCODERS:
        if name in configs:
            d[f"{name}_hidden"] = configs[name]["hidden_size"]
            d[f"{name}_projection"] = configs[name].get("projection_dim")
            d[f"{name}_vocab"] = configs[name]["vocab_size"]
    if unet.get("addition_embed_type") == "text_time":
        d["pooled_dim"] = configs["text_encoder_2"]["projection_dim"]
        d["time_ids_dim"] = (unet["projection_class_embeddings_input_dim"] - d["pooled_dim"]) \
            // unet["addition_time_embed_dim"]
    return d


def concrete_shape(t: Tensor, d: dict) -> tuple:
    """A tensor's shape with every name replaced by its size."""
    return tuple(x if isinstance(x, int) else d[x] for x in t.shape)


def manifest_shape(t: Tensor, d: dict) -> list:
    """Shape as the manifest records it: dynamic axes by name, the rest as numbers."""
    return [x if isinstance(x, int) or x in DYNAMIC else d[x] for x in t.shape]


def manifest_io(spec: ComponentSpec, d: dict) -> dict:
    """The manifest's inputs/outputs entries of one graph."""
    return {kind: [{"name": t.name, "dtype": t.dtype, "shape": manifest_shape(t, d)} for t in tensors]
            for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs))}
