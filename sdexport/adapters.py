"""Torch adapters: each exported component as a module whose forward takes the spec's inputs in order."""
from __future__ import annotations


def _base():
    """A torch.nn.Module holding the wrapped model as a submodule, so its weights export as initializers."""
    import torch

    class Adapter(torch.nn.Module):
        def __init__(self, spec, module):
            super().__init__()
            self.m = module
            self.inputs = [t.name for t in spec.inputs]
            self.outputs = [t.name for t in spec.outputs]
    return Adapter


def text_encoder(spec, module):
    """CLIP text encoder -> the spec's outputs: pooled/projected embeddings, last and per-layer hidden states."""
    class TextEncoder(_base()):
        def forward(self, input_ids):
            hidden = any(n.startswith("hidden_states.") for n in self.outputs)
            out = self.m(input_ids, output_hidden_states=hidden, return_dict=True)
            return tuple(out.hidden_states[int(n.split(".")[1])] if n.startswith("hidden_states.")
                         else getattr(out, n) for n in self.outputs)
    return TextEncoder(spec, module).eval()


def unet(spec, module):
    """UNet2DConditionModel with its optional inputs (SDXL text_time conditioning, LCM timestep_cond) by name."""
    class UNet(_base()):
        def forward(self, *args):
            a = dict(zip(self.inputs, args))
            added = {k: a[k] for k in ("text_embeds", "time_ids") if k in a}
            return (self.m(a["sample"], a["timestep"], a["encoder_hidden_states"], timestep_cond=a.get("timestep_cond"),
                           added_cond_kwargs=added or None, return_dict=False)[0],)
    return UNet(spec, module).eval()


def vae_encoder(spec, module):
    """AutoencoderKL.encode -> the latent distribution's parameters (mean ++ logvar; sampling stays on the host)."""
    class VaeEncoder(_base()):
        def forward(self, sample):
            return (self.m.encode(sample).latent_dist.parameters,)
    return VaeEncoder(spec, module).eval()


def vae_decoder(spec, module):
    """AutoencoderKL.decode of unscaled latents."""
    class VaeDecoder(_base()):
        def forward(self, latent_sample):
            return (self.m.decode(latent_sample, return_dict=False)[0],)
    return VaeDecoder(spec, module).eval()
