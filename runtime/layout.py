"""Names in the exported folder layout that both halves share (no onnxruntime import: the exporter reads it)."""
from __future__ import annotations

TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))   # graph folder, tokenizer folder
T5_ENCODER = ("text_encoder_3", "tokenizer_3")      # SD3's optional T5 encoder: graph folder, tokenizer.json folder
DENOISERS = ("unet", "transformer")                 # SD 1.x/2.x/XL UNet, or SD3's MMDiT transformer


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), as diffusers computes it."""
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
