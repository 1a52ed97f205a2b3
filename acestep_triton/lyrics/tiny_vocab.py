"""A small lyric vocabulary for tiny random checkpoints (tests, CI), in upstream's file format.

Character-level BPE (no merges) over what the normalisers emit: ASCII lower case, digits and
punctuation (pinyin and romaji are ASCII), lower-case Latin letters with diacritics, Cyrillic,
and a little typographic punctuation; anything else encodes as `[UNK]`. It also carries every
token `LyricTokenizer` needs by name: `[STOP]`, `[UNK]`, `[SPACE]`, `[START]`, the language tags
and the section tags. Ids differ from upstream's vocabulary, so a checkpoint built on this file
must size its lyric embedding with `LyricTokenizer.vocab_size`.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from acestep_triton.lyrics.tokenizer import (
    SPACE_TOKEN,
    START_TOKEN,
    STOP_TOKEN,
    STRUCTURE_TAGS,
    SUPPORTED_LANGUAGES,
    UNKNOWN_TOKEN,
    language_tag,
)


def _characters() -> list[str]:
    latin_with_diacritics = [chr(c) for c in range(0xC0, 0x180) if chr(c).islower()]
    cyrillic = [chr(c) for c in range(ord("а"), ord("я") + 1)] + ["ё"]
    extra_punctuation = list("¡¿«»°ºª·–—…‘’“”")
    ascii_chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return list(dict.fromkeys(ascii_chars + latin_with_diacritics + cyrillic + extra_punctuation))


def build_tiny_lyric_vocab(path: str | Path) -> Path:
    """Write the tiny vocabulary (a `tokenizers` JSON file, about 250 ids) to `path`; returns it."""
    special = (
        [STOP_TOKEN, UNKNOWN_TOKEN, SPACE_TOKEN, START_TOKEN]
        + [language_tag(language) for language in SUPPORTED_LANGUAGES]
        + list(STRUCTURE_TAGS)
    )
    vocab = {token: index for index, token in enumerate(special + _characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNKNOWN_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
