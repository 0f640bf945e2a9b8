"""Word-level tokenizers for the zoo models, built offline with Hugging Face ``tokenizers``.

Words are split on whitespace, so a target may be written ``"Mary"`` or ``" Mary"`` (the leading
space GPT-2 users are used to is simply dropped): both are the one token ``Mary``. Punctuation
marks that are words of the vocabulary (``,`` and ``.`` for ``ioi``) are also split off the words
they are attached to, so ``"the store, John"`` reads as ``the store , John``.

A word outside the vocabulary is refused when text is encoded, with an error that names it: the
models never saw ``<unk>``, so a prompt containing one would be explained as noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from depass_lens.errors import DePassInputError

SPECIALS = ("<pad>", "<bos>", "<unk>")


class ZooTokenizer(PreTrainedTokenizerFast):
    """A fast word-level tokenizer that refuses words outside its vocabulary, naming them."""

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` (after splitting) that are not in the vocabulary, in order."""
        vocab = self.get_vocab()
        pieces = self.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        return list(dict.fromkeys(word for word, _ in pieces if word not in vocab))

    def _refuse_unknown(self, text: Any) -> None:
        unknown = [w for t in _strings(text) for w in self.unknown_words(t)]
        if not unknown:
            return
        vocab = [w for w in self.get_vocab() if w not in SPECIALS]
        words = sorted(w for w in vocab if w.isalnum())
        marks = ", ".join(repr(m) for m in _marks(vocab))
        raise DePassInputError(
            f"the word-level tokenizer of {self.name_or_path!r} does not know "
            f"{', '.join(repr(w) for w in dict.fromkeys(unknown))}: not in the vocabulary of its "
            f"{len(vocab)} words (e.g. {', '.join(words[:8])}, ...; all of them: "
            "model.tokenizer.get_vocab()). Text is split on spaces"
            + (f" and on the marks {marks}" if marks else "")
        )

    def _encode_plus(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._refuse_unknown(text)
        self._refuse_unknown(text_pair)
        return super()._encode_plus(text, text_pair, *args, **kwargs)  # type: ignore[misc]

    def _batch_encode_plus(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers 4.x's batch path (5.x encodes batches in ``_encode_plus``)."""
        self._refuse_unknown(batch)
        return super()._batch_encode_plus(batch, *args, **kwargs)  # type: ignore[misc]


def _strings(text: Any) -> Iterable[str]:
    """Every string in a text, a pair, a batch or a pre-split batch."""
    if isinstance(text, str):
        yield text
    elif isinstance(text, list | tuple):
        for item in text:
            yield from _strings(item)


def _marks(words: Iterable[str]) -> list[str]:
    """The punctuation marks among ``words``: split off the words they are attached to."""
    return sorted(w for w in words if len(w) == 1 and not w.isalnum() and not w.isspace())


def build_tokenizer(words: Sequence[str], name: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``SPECIALS + words`` (ids in that order)."""
    vocab: dict[str, int] = {}
    for word in (*SPECIALS, *words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    marks = _marks(vocab)
    splits: list[Any] = [pre_tokenizers.WhitespaceSplit()]
    if marks:  # "store," -> "store" ","
        pattern = Regex("[" + "".join(re.escape(m) for m in marks) + "]")
        splits.append(pre_tokenizers.Split(pattern, behavior="isolated"))
    core.pre_tokenizer = pre_tokenizers.Sequence(splits)
    return ZooTokenizer(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=f"depass-lens-zoo-{name}",
        add_bos_token=True,  # TransformerLens then uses it as is (no hub round-trip)
    )
