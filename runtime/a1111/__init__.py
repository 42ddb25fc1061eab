"""AUTOMATIC1111 prompt syntax for the runtime: attention parsing, strict checks, chunking and emphasis."""
from .chunking import (
    CHUNK_LENGTH, COMMA_BACKTRACK, MAX_CHUNKS, ChunkedPrompt, ChunkTokenizer, PromptChunk, chunk_prompt,
    clip_chunk_tokenizer, empty_chunk, tokenize_line,
)
from .emphasis import apply_emphasis, chunk_count, encode_a1111, pad_cond_uncond
from .prompt_check import check_prompt, find_problems
from .prompt_parser import BREAK, is_break, parse_prompt_attention

__all__ = [
    "BREAK", "CHUNK_LENGTH", "COMMA_BACKTRACK", "MAX_CHUNKS", "ChunkTokenizer", "ChunkedPrompt", "PromptChunk",
    "apply_emphasis", "check_prompt", "chunk_count", "chunk_prompt", "clip_chunk_tokenizer", "empty_chunk",
    "encode_a1111", "find_problems", "is_break", "pad_cond_uncond", "parse_prompt_attention", "tokenize_line",
]
