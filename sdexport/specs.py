"""One declarative spec per exported component: inputs, outputs, dtypes, dynamic axes, tolerance."""
from __future__ import annotations

from dataclasses import dataclass

# Symbolic axis names. Concrete values come from `dims()`: the requested sizes plus the model's configs.
BATCH, SEQ, HEIGHT, WIDTH, LH, LW = "batch", "sequence", "height", "width", "latent_height", "latent_width"


@dataclass(frozen=True)
class Tensor:
    """A graph input or output; shape entries are ints, axis names, or config keys resolved by dims()."""
    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class ComponentSpec:
    """How one pipeline component is exported and checked."""
    name: str                 # folder in the exported layout
    module: str               # which loaded module it wraps: text_encoder | unet | vae
    inputs: tuple
    outputs: tuple
    atol: float               # verification: max abs error <= atol + rtol * max |reference|
    rtol: float

    @property
    def dynamic_axes(self) -> dict:
        """{tensor name: {axis index: axis name}} for the symbolic axes."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if d in DYNAMIC}
                for t in self.inputs + self.outputs if any(d in DYNAMIC for d in t.shape)}


DYNAMIC = (BATCH, SEQ, HEIGHT, WIDTH, LH, LW)

def _text_encoder(name: str, hidden: str, layers: int, projection: bool, hidden_states: bool) -> ComponentSpec:
    """A CLIP text encoder: (projected) pooled output, last hidden state, and optionally every layer's states."""
    seq_out = Tensor("last_hidden_state", "float32", (BATCH, SEQ, hidden))
    pooled = (Tensor("text_embeds", "float32", (BATCH, f"{name}_projection")) if projection
              else Tensor("pooler_output", "float32", (BATCH, hidden)))
    states = tuple(Tensor(f"hidden_states.{i}", "float32", (BATCH, SEQ, hidden)) for i in range(layers + 1))
    outputs = ((pooled, seq_out) if projection else (seq_out, pooled)) + (states if hidden_states else ())
    return ComponentSpec(name, name, inputs=(Tensor("input_ids", "int64", (BATCH, SEQ)),), outputs=outputs,
                         atol=1e-4, rtol=1e-4)


TEXT_ENCODER = _text_encoder("text_encoder", "text_encoder_hidden", 0, projection=False, hidden_states=False)

UNET_INPUTS = (Tensor("sample", "float32", (BATCH, "unet_in", LH, LW)),
               Tensor("timestep", "float32", ()),                     # rank-0, as Optimum exports it
               Tensor("encoder_hidden_states", "float32", (BATCH, SEQ, "cross_dim")))
UNET = ComponentSpec(
    "unet", "unet", inputs=UNET_INPUTS,
    outputs=(Tensor("out_sample", "float32", (BATCH, "unet_out", LH, LW)),), atol=1e-4, rtol=1e-4)
TEXT_TIME_INPUTS = (Tensor("text_embeds", "float32", (BATCH, "pooled_dim")),   # SDXL added conditioning
                    Tensor("time_ids", "float32", (BATCH, "time_ids_dim")))
TIMESTEP_COND = Tensor("timestep_cond", "float32", (BATCH, "time_cond_dim"))   # LCM guidance embedding

VAE_ENCODER = ComponentSpec(
    "vae_encoder", "vae",
    inputs=(Tensor("sample", "float32", (BATCH, "image_channels", HEIGHT, WIDTH)),),
    outputs=(Tensor("latent_parameters", "float32", (BATCH, "latent_moments", LH, LW)),),  # mean ++ logvar
    atol=1e-4, rtol=1e-4)

VAE_DECODER = ComponentSpec(
    "vae_decoder", "vae",
    inputs=(Tensor("latent_sample", "float32", (BATCH, "latent_channels", LH, LW)),),
    outputs=(Tensor("sample", "float32", (BATCH, "image_channels", HEIGHT, WIDTH)),),
    atol=1e-4, rtol=1e-4)

SD_COMPONENTS = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)


def unet_spec(unet: dict) -> ComponentSpec:
    """The UNet's inputs follow its config: SDXL text_time conditioning, LCM guidance embedding."""
    extra = TEXT_TIME_INPUTS if unet.get("addition_embed_type") == "text_time" else ()
    extra += (TIMESTEP_COND,) if unet.get("time_cond_proj_dim") else ()
    return ComponentSpec("unet", "unet", UNET_INPUTS + extra, UNET.outputs, UNET.atol, UNET.rtol)


def component_specs(configs: dict) -> tuple:
    """Every graph this model exports, decided by which components and config keys it has."""
    two = "text_encoder_2" in configs    # SDXL-style: both encoders feed their penultimate layer's states
    texts = tuple(_text_encoder(name, f"{name}_hidden", configs[name]["num_hidden_layers"],
                                projection=name == "text_encoder_2", hidden_states=two)
                  for name in ("text_encoder", "text_encoder_2") if name in configs)
    return texts + (unet_spec(configs["unet"]), VAE_ENCODER, VAE_DECODER)


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), as diffusers computes it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def dims(configs: dict, batch: int, height: int, width: int, sequence: int) -> dict:
    """Concrete sizes of every symbolic axis and config key, for one sample shape."""
    unet, vae = configs["unet"], configs["vae"]
    f = vae_scale_factor(vae)
    d = {BATCH: batch, SEQ: sequence, HEIGHT: height, WIDTH: width, LH: height // f, LW: width // f,
         "unet_in": unet["in_channels"], "unet_out": unet["out_channels"], "cross_dim": unet["cross_attention_dim"],
         "image_channels": vae["in_channels"], "latent_channels": vae["latent_channels"],
         "latent_moments": 2 * vae["latent_channels"], "time_cond_dim": unet.get("time_cond_proj_dim")}
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            d[f"{name}_hidden"] = configs[name]["hidden_size"]
            d[f"{name}_projection"] = configs[name].get("projection_dim")
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
