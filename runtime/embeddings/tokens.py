"""Prompt tokens for textual-inversion embeddings: diffusers' added tokens (plain syntax) and A1111's id matching.

diffusers (loaders/textual_inversion.py): an embedding of n vectors adds the tokens `name`, `name_1` ...
`name_{n-1}` (normalized, not special) after the vocabulary, and a prompt's `name` stands for all n of them
(maybe_convert_prompt). A1111 (EmbeddingDatabase.find_embedding_at_position): the name is tokenized as prompt
text, and wherever its ids occur in a prompt's ids (longest name first) they are replaced by the n vectors.
Both index the same rows: the text encoder's token table extended by the embeddings' vectors.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer

from ..errors import UserError
from ..tokenizer import ClipTokenizer


def word_tokens(name: str, count: int) -> list:
    """The tokens diffusers adds for an embedding of `count` vectors: name, name_1, ..."""
    return [name] + [f"{name}_{i}" for i in range(1, count)]


def vocab_collision(vocab: dict, name: str, count: int) -> str | None:
    """Why an embedding's name cannot become tokens (one of them is a vocabulary word, any case), or None."""
    for token in word_tokens(name, count):
        for form in (token, token.lower(), token.lower() + "</w>"):
            if form in vocab:
                return (f"embedding {name}: its token {token!r} is already a word of the tokenizer's vocabulary "
                        f"({form!r}); rename the file (diffusers refuses such names too)")
    return None


def find_sequences(ids: list, lookup: dict):
    """(position, length, payload) of each run of `ids` that a lookup {first id: [(ids, payload)]} names, left
    to right without overlaps, longest first at each position (A1111's find_embedding_at_position)."""
    i = 0
    while i < len(ids):
        for seq, payload in lookup.get(ids[i], ()):
            if tuple(ids[i:i + len(seq)]) == seq:
                yield i, len(seq), payload
                i += len(seq)
                break
        else:
            i += 1


def _add(lookup: dict, seq: tuple, payload) -> None:
    """Register one id sequence, keeping each first id's list longest first."""
    if seq:
        lookup.setdefault(seq[0], []).append((seq, payload))
        lookup[seq[0]].sort(key=lambda item: -len(item[0]))


class EmbeddingTokenizer(ClipTokenizer):
    """A ClipTokenizer whose plain prompts see the embeddings' words as diffusers does (each expanded to its
    vectors' ids before truncation); `a1111_ids` finds them in untruncated ids as A1111 does."""

    def __init__(self, base: ClipTokenizer, embeddings, first_id: int, unusable=()):
        backend = Tokenizer.from_str(base.backend.to_str())
        words, self.expand, self.lookup, self.unusable_lookup = [], {}, {}, {}
        next_id = first_id
        for e in embeddings:
            ids = tuple(range(next_id, next_id + e.count))
            words += word_tokens(e.name, e.count)
            self.expand[ids[0]] = ids
            _add(self.lookup, self._name_ids(base, e.name), ids)
            next_id += e.count
        for name in unusable:
            _add(self.unusable_lookup, self._name_ids(base, name), name)
        backend.add_tokens([AddedToken(w, single_word=False, lstrip=False, rstrip=False, normalized=True,
                                       special=False) for w in words])
        wrong = [w for w, want in zip(words, range(first_id, next_id)) if backend.token_to_id(w) != want]
        if wrong:
            raise UserError(f"embedding token {wrong[0]!r} does not get its own id after the text encoder's "
                            f"{first_id} rows (a duplicate name, or a tokenizer of another size)")
        token = base.backend.id_to_token
        super().__init__(backend, token(base.bos_token_id), token(base.eos_token_id), token(base.pad_token_id),
                         base.model_max_length)
        self.base, self.first_id = base, first_id

    @staticmethod
    def _name_ids(base: ClipTokenizer, name: str) -> tuple:
        """A name tokenized as prompt text (no bos/eos), as A1111 registers it."""
        return tuple(base.backend.encode(name, add_special_tokens=False).ids)

    def _expanded(self, enc) -> tuple[list, list]:
        """An encoding's ids with each embedding's first token expanded to all of its ids (offsets repeated)."""
        ids, offsets = [], []
        for i, offset in zip(enc.ids, enc.offsets):
            more = self.expand.get(i, (i,))
            ids += more
            offsets += [offset] * len(more)
        return ids, offsets

    def uses_embedding(self, text: str) -> bool:
        """Whether a plain prompt holds an embedding's token."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return max(ids, default=0) >= self.first_id

    def a1111_ids(self, ids: list) -> list:
        """Untruncated prompt ids (base tokenizer) with each embedding's name ids replaced by its vectors' ids."""
        out, last = [], 0
        for pos, length, new in find_sequences(ids, self.lookup):
            out += list(ids[last:pos]) + list(new)
            last = pos + length
        return out + list(ids[last:])
