"""T5 tokenizer for the torch-free runtime: tokenizer.json through the `tokenizers` library, as T5TokenizerFast.

SD3 tokenizes its third prompt as diffusers' StableDiffusion3Pipeline._get_t5_prompt_embeds does: padding to
max_length with <pad>, truncation that keeps room for the closing </s> the post-processor appends.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .tokenizer import WARN_CHARS, TruncateCallback, _check_prompts, _content, _read_json, repair_surrogates

MAX_SEQUENCE_LENGTH = 512           # diffusers refuses longer T5 sequences for SD3


class T5Tokenizer:
    """Unigram (SentencePiece) tokenizer returning fixed-length int64 id arrays like transformers' T5TokenizerFast."""

    def __init__(self, backend: Tokenizer, pad: str):
        """Wrap a tokenizers.Tokenizer whose post-processor adds T5's special tokens; pad is a token string."""
        pad_id = backend.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"tokenizer has no id for pad token {pad!r}")
        backend.no_truncation()
        backend.no_padding()
        self._backend, self._pad_id = backend, pad_id
        self._specials = backend.num_special_tokens_to_add(False)

    @classmethod
    def from_folder(cls, path: str | Path) -> T5Tokenizer:
        """Load an SD3 tokenizer_3/ folder (tokenizer.json; spiece.model alone is not read)."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"tokenizer folder {folder} has no tokenizer.json (the runtime does not read "
                             "spiece.model; T5TokenizerFast.save_pretrained writes tokenizer.json)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust parser raises plain Exception
            raise ValueError(f"{file}: cannot load tokenizer: {exc}") from None
        values = _read_json(folder / "tokenizer_config.json") | _read_json(folder / "special_tokens_map.json")
        try:
            return cls(backend, _content(values.get("pad_token") or "<pad>"))
        except ValueError as exc:
            raise ValueError(f"tokenizer folder {folder}: {exc}") from None

    @property
    def pad_token_id(self) -> int:
        """Id used to pad rows to the requested length."""
        return self._pad_id

    def _encode(self, prompts: list[str], length: int) -> list[tuple[list[int], str | None]]:
        """(ids with T5's closing tokens, dropped text or None) per prompt, truncated to `length` ids."""
        texts = [repair_surrogates(p) for p in prompts]
        keep = length - self._specials
        out = []
        for text, enc in zip(texts, self._backend.encode_batch(texts, add_special_tokens=False)):
            dropped = text[enc.offsets[keep][0]:].strip() if len(enc.ids) > keep else None
            enc.truncate(keep)
            out.append((self._backend.post_process(enc).ids, dropped))
        return out

    def __call__(self, prompts: list[str], max_length: int, on_truncate: TruncateCallback | None = None) -> np.ndarray:
        """Tokenize prompts to an int64 array of shape (len(prompts), max_length), padded with <pad>."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or \
                not self._specials < max_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be an integer in [{self._specials + 1}, "
                             f"{MAX_SEQUENCE_LENGTH}], got {max_length!r}")
        encoded = self._encode(_check_prompts(prompts), max_length)
        out = np.full((len(encoded), max_length), self._pad_id, dtype=np.int64)
        for i, (ids, dropped) in enumerate(encoded):
            out[i, :len(ids)] = ids
            if dropped is not None:
                (on_truncate or _warn(max_length))(i, dropped)
        return out


def _warn(length: int) -> TruncateCallback:
    """The default truncation report: a UserWarning naming the dropped text, as diffusers logs it."""
    def report(index: int, dropped: str) -> None:
        shown = dropped if len(dropped) <= WARN_CHARS else dropped[:WARN_CHARS] + "..."
        warnings.warn(f"prompt {index} truncated to max_sequence_length {length} T5 tokens; dropped: {shown!r}",
                      UserWarning, stacklevel=4)
    return report
