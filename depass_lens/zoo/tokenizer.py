"""Word-level tokenizers for the zoo models, built offline with Hugging Face ``tokenizers``.

Words are split on whitespace, so a target may be written ``"Mary"`` or ``" Mary"`` (the leading
space GPT-2 users are used to is simply dropped): both are the one token ``Mary``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<unk>")


def build_tokenizer(words: Sequence[str], name: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``SPECIALS + words`` (ids in that order)."""
    vocab: dict[str, int] = {}
    for word in (*SPECIALS, *words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=f"depass-lens-zoo-{name}",
        add_bos_token=True,  # TransformerLens then uses it as is (no hub round-trip)
    )
