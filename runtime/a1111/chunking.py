"""A1111 prompt chunking: weighted runs -> chunks of 75 tokens wrapped to 77 ids, with per-token weights.

References (AUTOMATIC1111/stable-diffusion-webui):
- modules/sd_hijack_clip.py, FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line: each run is tokenized on
  its own without bos/eos and untruncated; a chunk holds 75 tokens; when it is full and the last comma is at
  most `comma_padding_backtrack` (default 20) tokens back, the tokens after that comma move to the next
  chunk; the BREAK marker closes the chunk; an empty prompt still gives one chunk; the token count adds 75
  per closed chunk and the real length of the last one.
- next_chunk: content is padded to 75, then bos + content + eos; padding and both ends weigh 1.0.
- process_tokens: ids after the first eos become id_pad. id_pad is id_end for the CLIP tokenizer
  (FrozenCLIPEmbedderWithCustomWords, SD 1.x and SDXL's first encoder) and 0 for OpenCLIP
  (sd_hijack_open_clip.py: SD 2.x and SDXL's second encoder); the comma is the vocabulary's ',</w>'.
- empty_chunk: bos then eos everywhere (pad after the first eos), all weights 1.0.
- Textual-inversion embeddings (chunk.fixes): an embedding's vectors stay in one chunk; when they do not fit in
  what is left of the current one, that chunk is closed (padded) first. Here an embedding is the run of ids that
  `ChunkTokenizer.spans` names by its first id (runtime.embeddings gives each vector an id of its own).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import UserError
from ..tokenizer import ClipTokenizer, repair_surrogates
from .prompt_parser import is_break, parse_prompt_attention

CHUNK_LENGTH = 75                   # content tokens per chunk; 77 ids with bos and eos
COMMA_BACKTRACK = 20                # A1111's comma_padding_backtrack default
MAX_CHUNKS = 20                     # 1500 tokens: longer prompts are refused


@dataclass(frozen=True)
class ChunkTokenizer:
    """What chunking needs of a tokenizer: texts -> ids without bos/eos, and the special ids."""
    encode: Callable[[list[str]], list[list[int]]]
    bos: int
    eos: int
    pad: int                        # A1111's id_pad: eos for CLIP (SD 1.x), 0 ('!') for OpenCLIP (SD 2.x, SDXL)
    comma: int | None               # id of ',</w>'; None turns comma back-tracking off
    spans: dict = field(default_factory=dict)   # first id of an embedding's run -> its vectors (kept in one chunk)


@dataclass(frozen=True)
class PromptChunk:
    """One encoder input row: 77 ids (bos, 75 content or pad, eos) and the weight of each."""
    ids: tuple[int, ...]            # (77,)
    weights: tuple[float, ...]      # (77,)


@dataclass(frozen=True)
class ChunkedPrompt:
    """A prompt's chunks and its token count as A1111 reports it (75 per full chunk plus the last's length)."""
    chunks: tuple[PromptChunk, ...]
    token_count: int


def wrap_chunk(tok: ChunkTokenizer, ids: Sequence[int], weights: Sequence[float]) -> PromptChunk:
    """bos + up to 75 content ids + eos + pad, weights 1.0 outside the content."""
    fill = CHUNK_LENGTH - len(ids)
    return PromptChunk((tok.bos, *ids, tok.eos, *[tok.pad] * fill), (1.0, *weights, 1.0, *[1.0] * fill))


def empty_chunk(tok: ChunkTokenizer) -> PromptChunk:
    """The chunk A1111 pads shorter prompts of one batch with (empty_chunk)."""
    return wrap_chunk(tok, (), ())


class _Builder:
    """The chunk being filled, the chunks closed so far, and the last comma's position (-1: none)."""

    def __init__(self, tok: ChunkTokenizer, backtrack: int):
        self.tok, self.backtrack = tok, backtrack
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.chunks: list[PromptChunk] = []
        self.count = 0
        self.last_comma = -1

    def close(self, last: bool = False) -> None:
        """next_chunk: count it, pad and wrap the current chunk, start an empty one."""
        self.count += len(self.ids) if last else CHUNK_LENGTH
        self.chunks.append(wrap_chunk(self.tok, self.ids, self.weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float, run: Sequence[int] = ()) -> None:
        """Append one token (or an embedding's `run` of ids starting with it), first closing a full chunk (after
        the last comma when it is near), and for a run that does not fit in the rest of the chunk, closing that."""
        if token == self.tok.comma:
            self.last_comma = len(self.ids)
        elif (self.backtrack and len(self.ids) == CHUNK_LENGTH and self.last_comma != -1
              and len(self.ids) - self.last_comma <= self.backtrack):
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()
            self.ids, self.weights = moved
        if len(self.ids) == CHUNK_LENGTH or (run and len(self.ids) + len(run) > CHUNK_LENGTH):
            self.close()
        for t in run or (token,):
            self.ids.append(t)
            self.weights.append(weight)


def chunk_prompt(runs: Sequence[tuple[str, float]], tok: ChunkTokenizer, comma_backtrack: int = COMMA_BACKTRACK,
                 max_chunks: int | None = MAX_CHUNKS) -> ChunkedPrompt:
    """tokenize_line over parsed runs; a UserError when the prompt needs more than max_chunks chunks."""
    builder = _Builder(tok, comma_backtrack)
    for ids, run in zip(tok.encode([text for text, _ in runs]), runs):
        if is_break(run):
            builder.close()
            continue
        i = 0
        while i < len(ids):
            n = tok.spans.get(ids[i], 1)
            n = n if n <= CHUNK_LENGTH else 1              # longer than a chunk: split like any tokens
            builder.add(ids[i], run[1], ids[i:i + n] if n > 1 else ())
            i += n
    if builder.ids or not builder.chunks:
        builder.close(last=True)
    if max_chunks is not None and len(builder.chunks) > max_chunks:
        raise UserError(f"prompt is {builder.count} tokens ({len(builder.chunks)} chunks of {CHUNK_LENGTH}); "
                        f"the limit is {max_chunks * CHUNK_LENGTH} tokens ({max_chunks} chunks)")
    return ChunkedPrompt(tuple(builder.chunks), builder.count)


def tokenize_line(prompt: str, tok: ChunkTokenizer, comma_backtrack: int = COMMA_BACKTRACK,
                  max_chunks: int | None = MAX_CHUNKS) -> ChunkedPrompt:
    """A1111's tokenize_line with emphasis on: parse_prompt_attention, then chunk_prompt."""
    return chunk_prompt(parse_prompt_attention(prompt), tok, comma_backtrack, max_chunks)


def clip_chunk_tokenizer(tokenizer: ClipTokenizer) -> ChunkTokenizer:
    """Adapt a ClipTokenizer: untruncated ids without bos/eos, its pad id as id_pad, ',</w>' as the comma."""
    backend = tokenizer.backend

    def encode(texts: list[str]) -> list[list[int]]:
        encodings = backend.encode_batch([repair_surrogates(t) for t in texts], add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    return ChunkTokenizer(encode, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          backend.token_to_id(",</w>"))
