"""CLIP tokenizer for the torch-free runtime, id-for-id equal to transformers' CLIPTokenizer."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
# transformers writes int(1e30) when a tokenizer has no length limit.
UNSET_MAX_LENGTH = int(1e30)
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLIP_DEFAULTS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
WARN_CHARS = 200

TruncateCallback = Callable[[int, str], None]


def _read_json(path: Path) -> dict:
    """Load a JSON object from path; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read tokenizer file: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _require(folder: Path, names: Iterable[str]) -> None:
    """Raise ValueError naming the folder and the first missing file."""
    for name in names:
        if not (folder / name).is_file():
            raise ValueError(f"tokenizer folder {folder} is missing {name}")


def _content(value: str | dict) -> str:
    """Return the text of a special token given as a str or a serialized AddedToken."""
    return value["content"] if isinstance(value, dict) else str(value)


def _added_token(value: str | dict) -> AddedToken:
    """Turn a config entry into an AddedToken with the flags transformers gives it."""
    if not isinstance(value, dict):
        return AddedToken(str(value), normalized=False, special=True)
    flags = ("single_word", "lstrip", "rstrip")
    return AddedToken(
        value["content"],
        **{f: bool(value.get(f, False)) for f in flags},
        normalized=bool(value.get("normalized", False)),
        special=bool(value.get("special", True)),
    )


def _special_values(config: dict, special_map: dict) -> dict[str, str | dict]:
    """Merge CLIP defaults, tokenizer_config.json and special_tokens_map.json (last wins)."""
    values = dict(CLIP_DEFAULTS)
    for source in (config, special_map):
        values.update({k: v for k, v in source.items() if k in SPECIAL_ATTRS and v is not None})
    return values


def _added_tokens(values: dict[str, str | dict], decoder: dict) -> list[AddedToken]:
    """List added tokens in the order, and with the flags, transformers registers them."""
    tokens = {spec["content"]: _added_token(spec) for _, spec in sorted(decoder.items(), key=lambda i: int(i[0]))}
    fixed = set(tokens)
    for attr in SPECIAL_ATTRS:
        if attr in values and _content(values[attr]) not in fixed:
            tokens[_content(values[attr])] = _added_token(values[attr])
    return list(tokens.values())


def _clip_pipeline(vocab: dict[str, int], merges: list, unk: str) -> Tokenizer:
    """Build CLIP's normalizer, pre-tokenizer, BPE model and decoder around vocab and merges."""
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_backend(folder: Path, values: dict[str, str | dict], decoder: dict) -> Tokenizer:
    """Build the tokenizers.Tokenizer transformers' CLIPTokenizer makes from vocab.json and merges.txt."""
    _require(folder, ("vocab.json", "merges.txt"))
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as exc:  # the Rust reader raises plain Exception
        raise ValueError(f"tokenizer folder {folder}: cannot read vocab.json/merges.txt: {exc}") from exc
    tok = _clip_pipeline(vocab, merges, _content(values["unk_token"]))
    tok.add_tokens(_added_tokens(values, decoder))
    bos, eos = _content(values["bos_token"]), _content(values["eos_token"])
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def _load_backend(folder: Path, values: dict[str, str | dict], decoder: dict) -> Tokenizer:
    """Load tokenizer.json (plus configured specials it lacks) when present, else build from vocab and merges."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return _build_backend(folder, values, decoder)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser raises plain Exception
        raise ValueError(f"{path}: cannot load tokenizer: {exc}") from exc
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    tok.add_tokens([t for t in _added_tokens(values, decoder) if t.content not in present])
    return tok


def _max_length(config: dict, folder: Path) -> int:
    """Read model_max_length, defaulting to CLIP's 77 when it is absent or unset."""
    value = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"tokenizer folder {folder}: model_max_length must be an int >= 2, got {value!r}")
    return DEFAULT_MAX_LENGTH if value >= UNSET_MAX_LENGTH else value


def repair_surrogates(text: str) -> str:
    """Text safe to encode as UTF-8: surrogate pairs joined, lone surrogates (undecodable argv bytes) -> U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _check_prompts(prompts: object) -> list[str]:
    """Return prompts as a list of str, or raise TypeError."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} must be a str, got {type(prompt).__name__}")
    return prompts


class ClipTokenizer:
    """CLIP BPE tokenizer returning fixed-length int64 id arrays like transformers' CLIPTokenizer."""

    def __init__(self, backend: Tokenizer, bos: str, eos: str, pad: str, model_max_length: int):
        """Wrap a tokenizers.Tokenizer; bos, eos and pad are token strings in its vocabulary."""
        tokens = {"bos": bos, "eos": eos, "pad": pad}
        ids = {name: backend.token_to_id(token) for name, token in tokens.items()}
        missing = [f"{name} token {tokens[name]!r}" for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer has no id for {', '.join(missing)}")
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._ids = ids
        self._max_length = model_max_length

    @classmethod
    def from_folder(cls, path: str | Path) -> ClipTokenizer:
        """Load a Stable Diffusion style tokenizer/ folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist or is not a folder")
        config = _read_json(folder / "tokenizer_config.json")
        values = _special_values(config, _read_json(folder / "special_tokens_map.json"))
        backend = _load_backend(folder, values, config.get("added_tokens_decoder") or {})
        bos, eos, pad = (_content(values[k]) for k in ("bos_token", "eos_token", "pad_token"))
        max_length = _max_length(config, folder)
        try:
            return cls(backend, bos, eos, pad, max_length)
        except ValueError as exc:
            raise ValueError(f"tokenizer folder {folder}: {exc}") from None

    @property
    def backend(self) -> Tokenizer:
        """The underlying tokenizers.Tokenizer."""
        return self._backend

    @property
    def model_max_length(self) -> int:
        """Length of every returned id row, bos and eos included."""
        return self._max_length

    @property
    def pad_token_id(self) -> int:
        """Id used to pad rows to model_max_length."""
        return self._ids["pad"]

    @property
    def bos_token_id(self) -> int:
        """Id of <|startoftext|>."""
        return self._ids["bos"]

    @property
    def eos_token_id(self) -> int:
        """Id of <|endoftext|>."""
        return self._ids["eos"]

    def _encode(self, prompts: list[str]) -> list[tuple[list[int], str | None]]:
        """Return (content ids, dropped text or None) per prompt, truncated to fit with bos and eos."""
        texts = [repair_surrogates(p) for p in prompts]
        keep = self._max_length - 2
        results = []
        for text, enc in zip(texts, self._backend.encode_batch(texts, add_special_tokens=False)):
            ids, offsets = self._expanded(enc)
            dropped = text[offsets[keep][0]:].strip() if len(ids) > keep else None
            results.append((ids[:keep], dropped))
        return results

    def _expanded(self, enc) -> tuple[list, list]:
        """(ids, offsets) of one encoding; a tokenizer with textual-inversion embeddings expands them here."""
        return enc.ids, enc.offsets

    def __call__(self, prompts: list[str], on_truncate: TruncateCallback | None = None) -> np.ndarray:
        """Tokenize prompts to an int64 array of shape (len(prompts), model_max_length)."""
        encoded = self._encode(_check_prompts(prompts))
        out = np.full((len(encoded), self._max_length), self.pad_token_id, dtype=np.int64)
        for i, (ids, dropped) in enumerate(encoded):
            out[i, : len(ids) + 2] = [self.bos_token_id, *ids, self.eos_token_id]
            if dropped is not None:
                (on_truncate or self._warn_truncated)(i, dropped)
        return out

    def truncated(self, prompt: str) -> str | None:
        """Return the text that tokenizing prompt would drop, or None if it fits."""
        return self._encode(_check_prompts([prompt]))[0][1]

    def _warn_truncated(self, index: int, dropped: str) -> None:
        """Default truncation report: a UserWarning naming the dropped text."""
        shown = dropped if len(dropped) <= WARN_CHARS else dropped[:WARN_CHARS] + "..."
        warnings.warn(
            f"prompt {index} truncated to {self._max_length} tokens; dropped: {shown!r}", UserWarning, stacklevel=3
        )
