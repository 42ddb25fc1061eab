"""One declarative spec per exported component: every fact about it, in one place.

A spec says which source module it wraps and how that module is loaded (class, tokenizer folder), its graph
inputs/outputs with dynamic axes, the torch adapter that traces it, the onnxruntime optimizer's model type,
the sample cases it is verified at and its tolerance. Every other table (profiles' component names, loaders,
optimizer types) derives from `component_specs` / `BASE`. Reference: Optimum's OnnxConfig / UNetOnnxConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from runtime.conditioning import NORMED_STATES
from runtime.layout import T5_ENCODER, TEXT_ENCODERS, vae_scale_factor

from . import adapters

# Symbolic axis names. Concrete values come from `dims()`: the requested sizes plus the model's configs.
BATCH, SEQ, HEIGHT, WIDTH, LH, LW = "batch", "sequence", "height", "width", "latent_height", "latent_width"
DYNAMIC = (BATCH, SEQ, HEIGHT, WIDTH, LH, LW)
DYNAMIC += tuple(f"{a}/{2 ** i}" for i in range(1, 6) for a in (LH, LW))   # latents halved by UNet levels
CLIP_LENGTH = 77                     # CLIP's context: one A1111 chunk is 75 tokens + BOS/EOS
T5_LENGTH = 256                      # SD3's T5 tokens: diffusers' max_sequence_length default


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
    sequences: tuple = ()     # (sequence at the native case, at the small case); () = CLIP's lengths

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
        den, f = denoiser_config(configs), vae_scale_factor(configs["vae"])
        native = den["sample_size"] * f
        step = f * (2 ** (len(den["block_out_channels"]) - 1) if "block_out_channels" in den  # sizes the UNet halves
                    else den["patch_size"])                                              # whole SD3 patches
        small = max(step, (native // 2) // step * step)
        first, long = self.sequences or (CLIP_LENGTH, CLIP_LENGTH if self.is_text else 2 * CLIP_LENGTH)
        return [(2, native, native, first), (1, small, small + step, long)]

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
            elif t.name == "timestep":                                    # per-sample (SD3): in [0, 1000)
                out[t.name] = torch.rand(shape, generator=g) * 1000
            elif t.name == "time_ids":                                    # sizes and crop offsets, in pixels
                out[t.name] = torch.randint(0, 1024, shape, generator=g).float()
            else:
                out[t.name] = torch.randn(shape, generator=g, dtype=torch.float32)
        return out


def text_encoder_spec(name: str, layers: int, projection: bool, hidden_states: bool,
                      clip_skip: bool = False) -> ComponentSpec:
    """A CLIP text encoder: (projected) pooled output, last hidden state, and optionally every layer's raw states
    (SDXL) or, for CLIP skip (SD 1.x/2.x), layers 1 .. L-1 passed through the final LayerNorm."""
    hidden = f"{name}_hidden"
    seq_out = Tensor("last_hidden_state", "float32", (BATCH, SEQ, hidden))
    pooled = (Tensor("text_embeds", "float32", (BATCH, f"{name}_projection")) if projection
              else Tensor("pooler_output", "float32", (BATCH, hidden)))
    states = tuple(Tensor(f"hidden_states.{i}", "float32", (BATCH, SEQ, hidden)) for i in range(layers + 1))
    normed = tuple(Tensor(f"{NORMED_STATES}.{i}", "float32", (BATCH, SEQ, hidden)) for i in range(1, layers))
    outputs = ((pooled, seq_out) if projection else (seq_out, pooled)) + (states if hidden_states else ()) \
        + (normed if clip_skip else ())
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

# ControlNet (diffusers ControlNetModel): its residuals, unscaled (conditioning_scale 1; the runtime scales them),
# feed a second UNet graph that adds them to its skip connections. Tolerance as the UNet's.
MID_RESIDUAL = "mid_block_res_sample"
CONTROLNET = ComponentSpec(
    "controlnet", "controlnet", "diffusers.ControlNetModel", adapters.controlnet, "unet",
    inputs=UNET_INPUTS + (Tensor("controlnet_cond", "float32", (BATCH, 3, HEIGHT, WIDTH)),), outputs=())
CONTROLLED_UNET = replace(UNET, name="unet_controlled")


def _halved(axis: str, times: int):
    """The name of a latent axis after `times` stride-2 downsamplers."""
    return axis if times == 0 else f"{axis}/{2 ** times}"


def residual_tensors(unet: dict) -> tuple:
    """ControlNet residuals in diffusers' order: conv_in, each down resnet, each downsampler; then the mid block."""
    chans, levels = unet["block_out_channels"], len(unet["block_out_channels"])
    per_block = unet["layers_per_block"]
    per_block = [per_block] * levels if isinstance(per_block, int) else per_block
    found = [(chans[0], 0)]                                     # (channels, halvings) of each residual
    for i, c in enumerate(chans):
        found += [(c, i)] * per_block[i] + ([(c, i + 1)] if i < levels - 1 else [])
    found.append((chans[-1], levels - 1))
    return tuple(Tensor(f"down_block_res_sample_{k}" if k < len(found) - 1 else MID_RESIDUAL, "float32",
                        (BATCH, c, _halved(LH, s), _halved(LW, s))) for k, (c, s) in enumerate(found))


def controlnet_name(index: int) -> str:
    """Graph folder of the index-th ControlNet: controlnet, controlnet_1, ..."""
    return "controlnet" if index == 0 else f"controlnet_{index}"


def controlnet_specs(configs: dict) -> tuple:
    """The residual UNet and each ControlNet in `configs` (controlnet, controlnet_1, ...), or nothing."""
    names = [controlnet_name(i) for i in range(len(configs)) if controlnet_name(i) in configs]
    if not names:
        return ()
    unet = unet_spec(configs["unet"])
    nets = []
    for name in names:
        cfg = configs[name]
        extra = TEXT_TIME_INPUTS if cfg.get("addition_embed_type") == "text_time" else ()
        cond = Tensor("controlnet_cond", "float32", (BATCH, cfg.get("conditioning_channels", 3), HEIGHT, WIDTH))
        inputs = (replace(UNET_INPUTS[0], shape=(BATCH, cfg["in_channels"], LH, LW)),) + UNET_INPUTS[1:] + (cond,)
        nets.append(replace(CONTROLNET, name=name, module=name, inputs=inputs + extra,
                            outputs=residual_tensors(cfg)))
    return (replace(CONTROLLED_UNET, inputs=unet.inputs + residual_tensors(configs["unet"])),) + tuple(nets)


# SD 3.x (MMDiT), Optimum's names: the transformer attends over CLIP's 77 + T5's max_sequence_length tokens.
TRANSFORMER = ComponentSpec(
    "transformer", "transformer", "diffusers.SD3Transformer2DModel", adapters.transformer, "mmdit",
    inputs=(Tensor("hidden_states", "float32", (BATCH, "unet_in", LH, LW)),
            Tensor("encoder_hidden_states", "float32", (BATCH, SEQ, "cross_dim")),
            Tensor("pooled_projections", "float32", (BATCH, "pooled_projection_dim")),
            Tensor("timestep", "float32", (BATCH,))),
    outputs=(Tensor("out_hidden_states", "float32", (BATCH, "unet_out", LH, LW)),),
    sequences=(CLIP_LENGTH + T5_LENGTH, 2 * CLIP_LENGTH))
T5 = ComponentSpec(
    T5_ENCODER[0], T5_ENCODER[0], "transformers.T5EncoderModel", adapters.t5_encoder, "t5",
    inputs=(Tensor("input_ids", "int64", (BATCH, SEQ)),),
    outputs=(Tensor("last_hidden_state", "float32", (BATCH, SEQ, f"{T5_ENCODER[0]}_hidden")),),
    tokenizer=T5_ENCODER[1], sequences=(T5_LENGTH, CLIP_LENGTH))

# Every component kind, before a model's configs refine it (layer counts, optional UNet inputs).
BASE = (text_encoder_spec("text_encoder", 0, False, False), text_encoder_spec("text_encoder_2", 0, True, False),
        UNET, VAE_ENCODER, VAE_DECODER, CONTROLNET, CONTROLLED_UNET, TRANSFORMER, T5)
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
    texts = tuple(text_encoder_spec(name, configs[name]["num_hidden_layers"], projection=_projects(name, configs),
                                    hidden_states=two, clip_skip=not two)     # A1111 has no clip skip for SDXL
                  for name, _ in TEXT_ENCODERS if name in configs)
    if "transformer" in configs:        # SD3: both CLIPs projected, T5 optional, MMDiT instead of the UNet
        return texts + ((T5,) if T5.module in configs else ()) + (TRANSFORMER, VAE_ENCODER, VAE_DECODER)
    return texts + (unet_spec(configs["unet"]), VAE_ENCODER, VAE_DECODER) + controlnet_specs(configs)


def _projects(name: str, configs: dict) -> bool:
    """Whether a CLIP text encoder has a text projection: text_encoder_2 always, text_encoder in SD3."""
    return name == "text_encoder_2" or "CLIPTextModelWithProjection" in configs[name].get("architectures", ())


def denoiser_config(configs: dict) -> dict:
    """The UNet's config, or SD3's transformer config with its text width under the UNet's key."""
    if "unet" in configs:
        return configs["unet"]
    return configs["transformer"] | {"cross_attention_dim": configs["transformer"]["joint_attention_dim"]}


def dims(configs: dict, batch: int, height: int, width: int, sequence: int) -> dict:
    """Concrete sizes of every symbolic axis and config key, for one sample shape."""
    unet, vae = denoiser_config(configs), configs["vae"]
    f = vae_scale_factor(vae)
    d = {BATCH: batch, SEQ: sequence, HEIGHT: height, WIDTH: width, LH: height // f, LW: width // f,
         "unet_in": unet["in_channels"], "unet_out": unet["out_channels"], "cross_dim": unet["cross_attention_dim"],
         "image_channels": vae["in_channels"], "latent_channels": vae["latent_channels"],
         "latent_moments": 2 * vae["latent_channels"], "time_cond_dim": unet.get("time_cond_proj_dim")}
    d |= {_halved(a, i): -(-d[a] // 2 ** i) for i in range(1, 6) for a in (LH, LW)}   # stride-2 convs round up
    for name, _ in TEXT_ENCODERS:
        if name in configs:
            d[f"{name}_hidden"] = configs[name]["hidden_size"]
            d[f"{name}_projection"] = configs[name].get("projection_dim")
            d[f"{name}_vocab"] = configs[name]["vocab_size"]
    if T5.module in configs:                                   # T5Config keeps its width as d_model
        t5 = configs[T5.module]
        d |= {f"{T5.module}_hidden": t5["d_model"], f"{T5.module}_vocab": t5["vocab_size"]}
    d["pooled_projection_dim"] = unet.get("pooled_projection_dim")
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
