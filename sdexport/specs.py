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

TEXT_ENCODER = ComponentSpec(
    "text_encoder", "text_encoder",
    inputs=(Tensor("input_ids", "int64", (BATCH, SEQ)),),
    outputs=(Tensor("last_hidden_state", "float32", (BATCH, SEQ, "text_hidden")),
             Tensor("pooler_output", "float32", (BATCH, "text_hidden"))),
    atol=1e-4, rtol=1e-4)

UNET = ComponentSpec(
    "unet", "unet",
    inputs=(Tensor("sample", "float32", (BATCH, "unet_in", LH, LW)),
            Tensor("timestep", "float32", ()),                     # rank-0, as Optimum exports it
            Tensor("encoder_hidden_states", "float32", (BATCH, SEQ, "cross_dim"))),
    outputs=(Tensor("out_sample", "float32", (BATCH, "unet_out", LH, LW)),),
    atol=1e-4, rtol=1e-4)

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


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), as diffusers computes it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def dims(configs: dict, batch: int, height: int, width: int, sequence: int) -> dict:
    """Concrete sizes of every symbolic axis and config key, for one sample shape."""
    te, unet, vae = configs["text_encoder"], configs["unet"], configs["vae"]
    f = vae_scale_factor(vae)
    return {BATCH: batch, SEQ: sequence, HEIGHT: height, WIDTH: width, LH: height // f, LW: width // f,
            "text_hidden": te["hidden_size"], "unet_in": unet["in_channels"], "unet_out": unet["out_channels"],
            "cross_dim": unet["cross_attention_dim"], "image_channels": vae["in_channels"],
            "latent_channels": vae["latent_channels"], "latent_moments": 2 * vae["latent_channels"]}


def concrete_shape(t: Tensor, d: dict) -> tuple:
    """A tensor's shape with every name replaced by its size."""
    return tuple(x if isinstance(x, int) else d[x] for x in t.shape)


def manifest_shape(t: Tensor, d: dict) -> list:
    """Shape as the manifest records it: dynamic axes by name, the rest as numbers."""
    return [x if isinstance(x, int) or x in DYNAMIC else d[x] for x in t.shape]
