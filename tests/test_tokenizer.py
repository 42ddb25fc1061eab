"""The runtime ClipTokenizer gives the same ids as transformers' CLIPTokenizer."""

import gzip
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from runtime.tokenizer import ClipTokenizer
from sdexport.clip_vocab import BPE_ASSET, write_clip_tokenizer

PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
WORDS = ["cat", "dog", "red", "blue", "tree", "house"]  # one BPE token each
LONG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(300))
PROMPTS = {
    "plain": "a photo of a cat",
    "uppercase": "A PHOTO OF A CAT, Highly Detailed",
    "punctuation": "cat!!! (masterpiece:1.2), [dog]; {tree}... \"quoted\" 'single' #tag @user",
    "contractions": "it's the dog's toy, they're here, I'M sure we'll go, you'd've",
    "numbers": "1girl, 4k, 8K UHD, 3.14159, 2024-01-01, 100%",
    "accents": "café crème brûlée, Ångström, naïve façade, ﬁne, e\u0301",
    "emoji": "a 🐱 and a 🐶 with ❤️ and 👩‍👩‍👧 family 🇯🇵",
    "chinese": "一只猫坐在桌子上, 漂亮的风景",
    "whitespace": "  a\tcat \n\n on   a\r\nmat \u3000 \u00a0 ",
    "special_literal": "a cat<|endoftext|>a dog <|startoftext|> end",
    "special_uppercase": "A <|ENDOFTEXT|> B <|StartOfText|> C",
    "control": "a\x00b\x07c\x1b[0m\u200bd\ufeffe",
    "long": LONG_PROMPT,
    "empty": "",
}
PADS = {"sd15": "<|endoftext|>", "sd2": "!"}


def _load(folder):
    """Load both tokenizers from folder."""
    return ClipTokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=list(PADS))
def pair(request, tmp_path_factory):
    """(runtime tokenizer, transformers tokenizer) for SD 1.5 and SD 2.x pad tokens."""
    folder = tmp_path_factory.mktemp(request.param)
    write_clip_tokenizer(folder, pad_token=PADS[request.param])
    return _load(folder)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """The runtime tokenizer on an SD 1.5 tokenizer folder."""
    folder = tmp_path_factory.mktemp("sd15_only")
    write_clip_tokenizer(folder)
    return ClipTokenizer.from_folder(folder)


def reference(hf, prompts):
    """Ids as diffusers gets them from transformers."""
    return hf(prompts, padding="max_length", max_length=hf.model_max_length, truncation=True,
              return_tensors="np").input_ids


def quiet(tok, prompts):
    """Tokenize without truncation reports."""
    return tok(prompts, on_truncate=lambda index, dropped: None)


def test_written_folder_matches_clip(tmp_path):
    write_clip_tokenizer(tmp_path, pad_token="!", model_max_length=64)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    source = gzip.decompress(BPE_ASSET.read_bytes()).decode("utf-8").split("\n")
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    assert merges[0] == "#version: 0.2" and merges[1:] == source[1:48895]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["do_lower_case"] is True
    assert config["model_max_length"] == 64 and config["pad_token"] == "!"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_photo_of_a_cat(pair):
    tok, hf = pair
    assert hf("a photo of a cat").input_ids == PHOTO_OF_A_CAT
    assert quiet(tok, ["a photo of a cat"])[0, :7].tolist() == PHOTO_OF_A_CAT


def test_token_properties(pair):
    tok, hf = pair
    got = (tok.model_max_length, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert got == (77, hf.pad_token_id, 49406, 49407)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_ids_match_transformers(pair, name):
    tok, hf = pair
    got = quiet(tok, [PROMPTS[name]])
    assert got.dtype == np.int64 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, reference(hf, [PROMPTS[name]]))


def test_batch_matches_transformers(pair):
    tok, hf = pair
    prompts = list(PROMPTS.values())
    np.testing.assert_array_equal(quiet(tok, prompts), reference(hf, prompts))


def test_backend_pipeline_matches_transformers(pair):
    tok, hf = pair
    ours_json, theirs = json.loads(tok.backend.to_str()), json.loads(hf.backend_tokenizer.to_str())
    for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours_json[key] == theirs[key], key


def test_tokenizer_json_folder(pair, tmp_path):
    _, hf = pair
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    tok, reloaded = _load(tmp_path)
    prompts = list(PROMPTS.values())
    np.testing.assert_array_equal(quiet(tok, prompts), reference(hf, prompts))
    np.testing.assert_array_equal(quiet(tok, prompts), reference(reloaded, prompts))
    assert tok.pad_token_id == hf.pad_token_id


def test_tokenizer_json_gains_configured_specials(pair, tmp_path):
    _, hf = pair
    hf.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "!"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|pad|>"}))
    tok, reloaded = _load(tmp_path)
    prompts = ["a cat!! <|pad|>", *PROMPTS.values()]
    np.testing.assert_array_equal(quiet(tok, prompts), reference(reloaded, prompts))
    assert tok.pad_token_id == reloaded.pad_token_id == 49408


def test_truncation_reports_dropped_text(pair):
    tok, hf = pair
    calls = []
    tok(["short", LONG_PROMPT], on_truncate=lambda index, dropped: calls.append((index, dropped)))
    full = hf([LONG_PROMPT]).input_ids[0]
    decoded = hf.decode(full[76:-1])  # what diffusers logs as removed
    assert calls == [(1, " ".join(LONG_PROMPT.split()[75:]))]
    assert calls[0][1] == decoded


def test_truncation_boundary(ours):
    fits = " ".join(["cat"] * 75)
    assert ours.truncated(fits) is None
    assert ours.truncated(fits + " dog") == "dog"
    assert ours.truncated("  " + fits + " \n ") is None


def test_truncation_warns_by_default(ours):
    with pytest.warns(UserWarning, match=r"prompt 0 truncated to 77 tokens; dropped: 'blue tree house"):
        ours([LONG_PROMPT])


def test_no_warning_when_prompt_fits(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["a photo of a cat", ""])


def test_very_long_prompt_warning_is_shortened(ours):
    with pytest.warns(UserWarning) as record:
        ours(["cat " * 100_000])
    assert len(str(record[0].message)) < 400


@pytest.mark.parametrize("text", ["\ud800", "a\udc00b", "\udfff\ud800", "x" * 200_000, "\x00" * 50, "\U0010ffff"])
def test_odd_strings_never_raise(ours, text):
    ids = quiet(ours, [text])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and 49407 in ids[0]


def test_surrogate_pair_is_joined(ours):
    np.testing.assert_array_equal(ours(["\ud83d\udc31"]), ours(["🐱"]))


def test_empty_batch(ours):
    assert ours([]).shape == (0, 77)


@pytest.mark.parametrize("bad", ["a cat", b"a cat", None, 3, [1], ["ok", None], [b"x"]])
def test_non_str_input_is_type_error(ours, bad):
    with pytest.raises(TypeError, match="str"):
        ours(bad)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ClipTokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize("remove, missing", [("vocab.json", "vocab.json"), ("merges.txt", "merges.txt")])
def test_missing_file_is_named(tmp_path, remove, missing):
    write_clip_tokenizer(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(ValueError, match=f"{tmp_path}.*{missing}"):
        ClipTokenizer.from_folder(tmp_path)


def test_config_files_are_optional(tmp_path):
    write_clip_tokenizer(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).unlink()
    tok = ClipTokenizer.from_folder(tmp_path)
    assert (tok.model_max_length, tok.pad_token_id) == (77, 49407)


def test_bad_max_length(tmp_path):
    write_clip_tokenizer(tmp_path, model_max_length=1)
    with pytest.raises(ValueError, match="model_max_length"):
        ClipTokenizer.from_folder(tmp_path)


FRAGMENTS = ["<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>", "'s", "'LL", "!", "!!", "#", " ", "\n", "\t",
             "a", "Cat", "É", "e\u0301", "1", "23", "🐱", "猫", "\x00", "\u200b", "ﬁ", "<", "|>"]
HYPOTHESIS = settings(max_examples=100, deadline=None)
NO_SURROGATES = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300)


@HYPOTHESIS
@given(text=st.text())
def test_any_text_never_raises(ours, text):
    ids = quiet(ours, [text])
    assert ids.shape == (1, 77) and ids[0, 0] == ours.bos_token_id and ours.eos_token_id in ids[0]


@HYPOTHESIS
@given(text=NO_SURROGATES)
def test_any_text_matches_transformers(pair, text):
    tok, hf = pair
    np.testing.assert_array_equal(quiet(tok, [text]), reference(hf, [text]))


@HYPOTHESIS
@given(text=st.lists(st.sampled_from(FRAGMENTS), max_size=120).map("".join))
def test_tricky_fragments_match_transformers(pair, text):
    tok, hf = pair
    np.testing.assert_array_equal(quiet(tok, [text]), reference(hf, [text]))
