"""Write a real CLIP BPE tokenizer folder from the bundled OpenAI CLIP merge list."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

BPE_ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, as CLIP's SimpleTokenizer does."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def load_merges() -> tuple[tuple[str, str], ...]:
    """Return the 48894 BPE merges CLIP uses, in rank order."""
    lines = gzip.decompress(BPE_ASSET.read_bytes()).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])


def build_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Build the 49408-entry token -> id map exactly as SimpleTokenizer does."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _added_token(content: str) -> dict:
    """Serialize a special token the way openai/clip-vit-large-patch14 does."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


def special_tokens_map(pad_token: str) -> dict:
    """Return the special_tokens_map.json content."""
    return {
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "unk_token": _added_token(EOS_TOKEN),
        "pad_token": pad_token,
    }


def tokenizer_config(pad_token: str, model_max_length: int) -> dict:
    """Return the tokenizer_config.json content."""
    specials = {k: {**v, "__type": "AddedToken"} if isinstance(v, dict) else v
                for k, v in special_tokens_map(pad_token).items()}
    return {
        **specials,
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }


def _write_json(path: Path, data: dict) -> None:
    """Write data as indented UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(dest: Path, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> None:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json into dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    merges = load_merges()
    (dest / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8")
    merge_lines = "\n".join(" ".join(m) for m in merges)
    (dest / "merges.txt").write_text(f"#version: 0.2\n{merge_lines}\n", encoding="utf-8")
    _write_json(dest / "special_tokens_map.json", special_tokens_map(pad_token))
    _write_json(dest / "tokenizer_config.json", tokenizer_config(pad_token, model_max_length))
