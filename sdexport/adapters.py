"""Torch adapters: each exported component as a module whose forward takes the spec's inputs in order."""
from __future__ import annotations

from runtime.conditioning import NORMED_STATES


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
    """CLIP text encoder -> the spec's outputs: pooled/projected embeddings, last hidden state, per-layer raw states
    (`hidden_states.{i}`) and per-layer states through the final LayerNorm (`normed_hidden_states.{i}`, CLIP skip as
    A1111's encode_with_transformers and diffusers' encode_prompt compute it)."""
    class TextEncoder(_base()):
        def forward(self, input_ids):
            hidden = any("." in n for n in self.outputs)
            out = self.m(input_ids, output_hidden_states=hidden, return_dict=True)
            return tuple(self.output(out, n) for n in self.outputs)

        def output(self, out, name: str):
            """One named output of the wrapped CLIPTextModel(WithProjection)'s result."""
            kind, _, index = name.partition(".")
            if kind == "hidden_states":
                return out.hidden_states[int(index)]                                 # (B, S, D)
            if kind == NORMED_STATES:
                norm = getattr(self.m, "text_model", self.m).final_layer_norm   # transformers 5: no text_model
                return norm(out.hidden_states[int(index)])                                 # (B, S, D)
            return getattr(out, name)
    return TextEncoder(spec, module).eval()


def unet(spec, module):
    """UNet2DConditionModel with its optional inputs (SDXL text_time conditioning, LCM timestep_cond) by name."""
    class UNet(_base()):
        def forward(self, *args):
            a = dict(zip(self.inputs, args))
            added = {k: a[k] for k in ("text_embeds", "time_ids") if k in a}
            down = [a[k] for k in self.inputs if k.startswith("down_block_res_sample_")]    # ControlNet residuals
            return (self.m(a["sample"], a["timestep"], a["encoder_hidden_states"], timestep_cond=a.get("timestep_cond"),
                           added_cond_kwargs=added or None, down_block_additional_residuals=down or None,
                           mid_block_additional_residual=a.get("mid_block_res_sample"), return_dict=False)[0],)
    return UNet(spec, module).eval()


def controlnet(spec, module):
    """ControlNetModel at conditioning_scale 1 -> its down-block residuals and mid-block residual, flattened."""
    class ControlNet(_base()):
        def forward(self, *args):
            a = dict(zip(self.inputs, args))
            added = {k: a[k] for k in ("text_embeds", "time_ids") if k in a}
            down, mid = self.m(a["sample"], a["timestep"], a["encoder_hidden_states"], a["controlnet_cond"],
                               conditioning_scale=1.0, added_cond_kwargs=added or None, return_dict=False)
            return (*down, mid)
    return ControlNet(spec, module).eval()


def transformer(spec, module):
    """SD3Transformer2DModel: latents, joint text states, pooled projections, per-sample timestep -> velocity."""
    class Transformer(_base()):
        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return (self.m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0],)
    return Transformer(spec, module).eval()


def t5_encoder(spec, module):
    """T5EncoderModel on token ids (no attention mask, as diffusers' SD3 pipelines call it) -> last hidden state."""
    class T5Encoder(_base()):
        def forward(self, input_ids):
            return (self.m(input_ids, return_dict=False)[0],)
    return T5Encoder(spec, module).eval()


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
