"""The built-in `tiny-sd3`: a Stable Diffusion 3.5-style pipeline at toy sizes, built offline from config.

Same layout and config keys as stabilityai/stable-diffusion-3.5-medium: SD3Transformer2DModel (MMDiT-X with a
dual-attention block and RMS QK-norm), two CLIP text encoders with projections (CLIP-L, CLIP-G), a T5 encoder
with a Unigram tokenizer saved as tokenizer.json, a 16-channel VAE with shift_factor, and a flow-matching scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import quiet_libraries

TINY_SD3_VERSION = 1      # bump when the configs below change: the cache key

TRANSFORMER_CONFIG = dict(   # stable-diffusion-3.5-medium's keys; 2 layers, the first with dual attention
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")

VAE_CONFIG = dict(           # 16 latent channels, no quant convs, SD3's scaling and shift factors
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False)

CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=0,
              eos_token_id=2, pad_token_id=1)
CLIP_G = CLIP_L | dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, projection_dim=48,
                       hidden_act="gelu")          # 32 + 48 = 80 pooled; states 80 wide, padded to 96 for T5's

T5_CONFIG = dict(            # t5-v1_1's gated-gelu encoder; d_model = the transformer's joint_attention_dim
    d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=6, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

T5_SPECIALS = ("<pad>", "</s>", "<unk>")         # ids 0, 1, 2 as in t5-v1_1
T5_EXTRA_IDS = 100
T5_WORDS = ("a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "painting", "red", "blue", "green",
            "white", "black", "cat", "dog", "barn", "house", "lighthouse", "dusk", "dawn", "sky", "sea", "tree",
            "forest", "mountain", "city", "street", "portrait", "woman", "man", "blurry", "low", "quality",
            "fog", "snow", "rain", "sun", "night", "light", "dark", "old", "new", "small", "large", "bright")


def build_tiny_sd3(dest: Path) -> None:
    """Save the seeded random-weight tiny SD3 pipeline in stable-diffusion-3.5-medium's folder layout."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .clip_vocab import write_clip_tokenizer
    from .tiny import prefix_text_model_keys

    quiet_libraries()
    torch.manual_seed(0)
    SD3Transformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(dest / "transformer")
    torch.manual_seed(1)
    AutoencoderKL(**VAE_CONFIG).save_pretrained(dest / "vae")
    for folder, config, pad, seed in (("text_encoder", CLIP_L, "<|endoftext|>", 2), ("text_encoder_2", CLIP_G, "!", 3)):
        torch.manual_seed(seed)
        CLIPTextModelWithProjection(CLIPTextConfig(**config)).save_pretrained(dest / folder)
        prefix_text_model_keys(dest / folder / "model.safetensors")
        write_clip_tokenizer(dest / folder.replace("text_encoder", "tokenizer"), pad_token=pad)
    vocab_size = write_t5_tokenizer(dest / "tokenizer_3")
    torch.manual_seed(4)
    T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG)).save_pretrained(dest / "text_encoder_3")
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (dest / "model_index.json").write_text(json.dumps(model_index(), indent=2))


def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities: specials, words, characters, then the sentinel <extra_id_N>."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'()")
    pieces = [(t, 0.0) for t in T5_SPECIALS] + [("▁", -6.0)]
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    return pieces + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]


def write_t5_tokenizer(folder: Path) -> int:
    """Write a T5-style tokenizer.json (built with `tokenizers`) and its transformers configs; the vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = t5_vocab()
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # the pipeline transformers' T5Tokenizer builds around a tokenizer.json's vocabulary
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    extra = [p for p, _ in vocab if p.startswith("<extra_id_")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*T5_SPECIALS, *extra)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials | {"additional_special_tokens": extra}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        specials | {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": T5_EXTRA_IDS,
                    "additional_special_tokens": extra}, indent=2))
    return len(vocab)


def model_index() -> dict:
    """model_index.json of diffusers' StableDiffusion3Pipeline."""
    import diffusers

    clip = ["transformers", "CLIPTextModelWithProjection"]
    return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": clip, "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": clip, "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "image_encoder": [None, None], "feature_extractor": [None, None]}
