"""A1111 prompt syntax: attention parsing, strict checks, chunking, emphasis and multi-chunk encoding."""
import numpy as np
import pytest

from runtime.a1111 import (
    BREAK, CHUNK_LENGTH, ChunkTokenizer, apply_emphasis, check_prompt, chunk_count, chunk_prompt,
    clip_chunk_tokenizer, empty_chunk, encode_a1111, find_problems, pad_cond_uncond, parse_prompt_attention,
    tokenize_line,
)
from runtime.errors import UserError
from runtime.tokenizer import ClipTokenizer

# The doctest examples of parse_prompt_attention in A1111's modules/prompt_parser.py, outputs as printed there.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
WORDS = ["cat", "dog", "red", "blue", "tree", "house"]      # one BPE token each


def words(n: int, start: int = 0) -> str:
    """n one-token words."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def clip(tiny_folder):
    """The tiny model's tokenizer (real CLIP BPE vocabulary)."""
    return ClipTokenizer.from_folder(tiny_folder / "tokenizer")


@pytest.fixture(scope="module")
def tok(clip):
    """The chunking adapter over it."""
    return clip_chunk_tokenizer(clip)


def content(chunk, tok):
    """The content ids of a chunk: between bos and the first eos."""
    ids = list(chunk.ids)
    assert ids[0] == tok.bos and len(ids) == CHUNK_LENGTH + 2
    return ids[1:ids.index(tok.eos)]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_parser_matches_a1111_docstring(prompt, expected):
    assert parse_prompt_attention(prompt) == [tuple(run) for run in expected]


@pytest.mark.parametrize("prompt, expected", [
    ("(x)", [("x", 1.1)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("a \\\\ b \\[c\\)", [("a \\ b [c)", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("", [("", 1.0)]),
    ("(a:", [("a:", 1.1)]),                   # A1111 reads an unclosed weight as text
    ("(a:b)", [("a:b", 1.1)]),                # and a weight that is not a number too
    ("x) y]", [("x) y]", 1.0)]),              # closing brackets with nothing open are text
    ("[a (b]", [("a ", 1 / 1.1), ("b", (1 / 1.1) * 1.1)]),   # unclosed "(" applies at the end
])
def test_parser_rules(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_unparseable_weight_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^prompt: weight '1\.2\.3' in '\(a:1\.2\.3\)' is not a number$"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.mark.parametrize("prompt, message", [
    ("(a:b)", "prompt: weight 'b' in '(a:b)' is not a number"),
    ("(a:", "prompt: '(a:' opens a weight that is never closed with ')'"),
    ("x (a:1.5", "prompt: '(a:1.5' opens a weight that is never closed with ')'"),
    ("(a: 1.2)", "prompt: weight ' 1.2' in '(a: 1.2)' has spaces, which A1111 reads as text; write it as ':1.2)'"),
    ("(a:1.2.3)", "prompt: weight '1.2.3' in '(a:1.2.3)' is not a number"),
    ("(a BREAK b)", "prompt: BREAK inside brackets in '(a BREAK' is read as the word BREAK, not a chunk break"),
    ("a [cat:dog:0.5]", "prompt: prompt editing '[cat:dog:0.5]' is not supported"),
    ("[cat|dog]", "prompt: prompt editing '[cat|dog]' is not supported"),
    ("cat AND dog", "prompt: AND (composable prompts) is not supported"),
])
def test_strict_check_names_the_problem(prompt, message):
    with pytest.raises(UserError) as info:
        check_prompt(prompt)
    assert str(info.value) == message and "\n" not in message


@pytest.mark.parametrize("prompt", [
    "", "normal text", A1111_EXAMPLES[5][0], "(a:1.2) [b] ((c)) (d:-0.5) \\(e\\)", "a BREAK b", "16:9, [a:b]",
    "(a:b:1.2)", "(unbalanced",
])
def test_strict_check_accepts_what_reads_as_written(prompt):
    assert find_problems(prompt) == []
    check_prompt(prompt, label="negative prompt")


def test_adapter_matches_a1111_tokenize(clip, tok, tiny_folder):
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    texts = ["a photo of a cat, highly detailed", "", words(100), " (x) "]
    assert tok.encode(texts) == hf(texts, truncation=False, add_special_tokens=False)["input_ids"]
    assert tok.comma == hf.get_vocab()[",</w>"]
    assert (tok.bos, tok.eos, tok.pad) == (clip.bos_token_id, clip.eos_token_id, clip.eos_token_id)


def test_150_tokens_make_two_chunks(tok):
    result = tokenize_line(words(150), tok)
    assert len(result.chunks) == 2 and result.token_count == 150
    ids = tok.encode([words(150)])[0]
    assert [content(c, tok) for c in result.chunks] == [ids[:75], ids[75:]]
    assert all(c.ids[-1] == tok.eos for c in result.chunks)


def test_comma_backtracking_moves_the_tail_to_the_next_chunk(tok):
    prompt = words(70) + ", " + words(10, start=3)                 # comma is token 71 of 81
    ids = tok.encode([prompt])[0]
    first, second = tokenize_line(prompt, tok).chunks
    assert content(first, tok) == ids[:71] and content(first, tok)[-1] == tok.comma
    assert content(second, tok) == ids[71:]
    assert first.ids[72:] == (tok.eos,) + (tok.pad,) * 4
    no_backtrack = tokenize_line(prompt, tok, comma_backtrack=0).chunks
    assert [content(c, tok) for c in no_backtrack] == [ids[:75], ids[75:]]


def test_a_far_comma_does_not_backtrack(tok):
    prompt = words(10) + ", " + words(80)                         # comma 65 tokens before the chunk's end
    ids = tok.encode([prompt])[0]
    assert [content(c, tok) for c in tokenize_line(prompt, tok).chunks] == [ids[:75], ids[75:]]


def test_break_starts_a_new_chunk(tok):
    result = tokenize_line("cat BREAK dog", tok)
    assert [content(c, tok) for c in result.chunks] == tok.encode(["cat", "dog"])
    assert result.token_count == CHUNK_LENGTH + 1


def test_empty_prompt_is_one_chunk(tok):
    result = tokenize_line("", tok)
    assert result.chunks == (empty_chunk(tok),) and result.token_count == 0
    assert result.chunks[0].ids == (tok.bos,) + (tok.eos,) * 76 and result.chunks[0].weights == (1.0,) * 77


def test_weights_follow_tokens(tok):
    chunk = tokenize_line("(cat) [dog] (red:1.5) tree", tok).chunks[0]
    assert chunk.weights[:6] == (1.0, 1.1, 1 / 1.1, 1.5, 1.0, 1.0) and set(chunk.weights[6:]) == {1.0}


def test_pad_id_after_eos(tmp_path):
    from sdexport.clip_vocab import write_clip_tokenizer

    write_clip_tokenizer(tmp_path, pad_token="!")                  # SD 2.x / SDXL OpenCLIP tokenizer
    tok = clip_chunk_tokenizer(ClipTokenizer.from_folder(tmp_path))
    chunk = tokenize_line("cat dog", tok).chunks[0]
    assert tok.pad == 0 and chunk.ids[:4] == (tok.bos, *tok.encode(["cat dog"])[0], tok.eos)
    assert chunk.ids[4:] == (0,) * 73


def test_fake_tokenizer_protocol():
    tok = ChunkTokenizer(lambda texts: [[int(w) for w in t.split()] for t in texts], bos=1, eos=2, pad=0, comma=9)
    runs = [(" ".join(["5"] * 60 + ["9"] + ["6"] * 20), 1.0)]       # comma at 60: 15 tokens back at the 76th
    first, second = chunk_prompt(runs, tok).chunks
    assert first.ids == (1,) + (5,) * 60 + (9, 2) + (0,) * 14 and second.ids[:21] == (1,) + (6,) * 20


def test_too_long_prompt_is_a_one_line_error(tok):
    with pytest.raises(UserError) as info:
        tokenize_line(words(1600), tok)
    assert str(info.value) == "prompt is 1600 tokens (22 chunks of 75); the limit is 1500 tokens (20 chunks)"
    assert len(tokenize_line(words(1600), tok, max_chunks=None).chunks) == 22


def test_emphasis_matches_direct_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 77, 16)).astype(np.float32) + 0.5
    w = rng.uniform(0.5, 1.5, (3, 77)).astype(np.float32)
    expected = []
    for zi, wi in zip(z, w):
        weighted = zi * wi[:, None]
        expected.append(weighted * (zi.mean() / weighted.mean()))
    out = apply_emphasis(z, w)
    assert out.dtype == np.float32 and out.shape == z.shape
    np.testing.assert_allclose(out, np.stack(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_emphasis(z, np.ones((3, 77))), z, rtol=1e-6)


def fake_encoder(calls):
    """A text encoder stand-in: states (N, 77, 4) and pooled (N, 2) from the ids, recording each call."""
    def encode(ids):
        calls.append(ids)
        states = (ids[:, :, None] % 7 + 1.0) * np.arange(1, 5, dtype=np.float32)
        return states.astype(np.float32), ids[:, :2].astype(np.float32)
    return encode


def test_encode_a1111_concatenates_chunks_and_pools_the_first(tok):
    long, short = tokenize_line(words(100), tok), tokenize_line("(cat) dog", tok)
    calls = []
    states, pooled = encode_a1111(fake_encoder(calls), [long.chunks, short.chunks], empty_chunk(tok))
    assert states.shape == (2, 154, 4) and chunk_count(states) == 2
    assert [c.shape for c in calls] == [(2, 77), (2, 77)] and all(c.dtype == np.int64 for c in calls)
    for i, chunk in enumerate([long.chunks[0], long.chunks[1], short.chunks[0], empty_chunk(tok)]):
        ids = np.array([chunk.ids], np.int64)
        raw, _ = fake_encoder([])(ids)
        expected = apply_emphasis(raw, np.array([chunk.weights]))[0]
        np.testing.assert_allclose(states[i // 2, (i % 2) * 77:(i % 2 + 1) * 77], expected, rtol=1e-6)
    np.testing.assert_array_equal(pooled, calls[0][:, :2])


def test_pad_cond_uncond():
    cond, uncond, empty = np.ones((2, 231, 4)), np.zeros((2, 77, 4)), np.full((1, 77, 4), 5.0)
    padded_cond, padded_uncond = pad_cond_uncond(cond, uncond, empty)
    assert padded_cond is cond and padded_uncond.shape == (2, 231, 4)
    assert (padded_uncond[:, 77:] == 5.0).all() and (padded_uncond[:, :77] == 0).all()
    swapped = pad_cond_uncond(uncond, cond, empty)
    assert swapped[0].shape == (2, 231, 4) and swapped[1] is cond


def test_encode_a1111_one_prompt_needs_no_empty_chunk(tok):
    chunks = tokenize_line(words(80), tok).chunks
    states, pooled = encode_a1111(fake_encoder([]), [chunks])
    assert states.shape == (1, 154, 4) and pooled.shape == (1, 2)
    with pytest.raises(ValueError, match="empty chunk"):
        encode_a1111(fake_encoder([]), [chunks, chunks[:1]])


def test_problems_in_multiline_prompts_stay_one_line():
    with pytest.raises(UserError) as info:
        check_prompt("a cat\n(on a\nmat: big)\n", label="negative prompt")
    assert str(info.value) == r"negative prompt: weight ' big' in '(on a\nmat: big)' is not a number"
