"""Lyric text -> lyric token ids, id for id as upstream ACE-Step v1's pipeline produces them.

For each line of the lyrics (split at "\\n", stripped):

- an empty line gives the line end alone;
- otherwise the language is detected (`language.detect_language`); languages the model has no
  tag for fall back to en. Lines starting with a `[...]` structure tag are encoded as en whatever
  was detected. The line is normalised for that language, prefixed with its tag (`[en]`,
  `[zh-cn]`, ...), its spaces become `[SPACE]`, and the BPE vocabulary encodes it;
- every line ends with the line-end id (the `[SPACE]` token).

The sequence starts with `[START]`. A line whose normalisation or encoding fails is left out (no
line end either), as upstream does; it is logged.

`tokenize("")` returns `[START, line end]` (one empty line), which is what upstream's
`tokenize_lyrics("")` gives. Upstream's pipeline never calls it for empty lyrics: it feeds ids
`[0]` with mask `[0]` instead. `token_ids_and_mask` applies that rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from acestep_triton.lyrics.language import detect_language
from acestep_triton.lyrics.normalize import normalize_line

logger = logging.getLogger(__name__)

# Languages the lyric encoder has a tag token for; everything else is encoded as en.
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "en", "de", "fr", "es", "it", "pt", "pl", "tr", "ru", "cs", "nl", "ar", "zh", "ja", "hu", "ko", "hi",
)  # fmt: skip
FALLBACK_LANGUAGE = "en"
STRUCTURE_TAG = re.compile(r"\[.*?\]")  # matched at the start of a stripped line

START_TOKEN = "[START]"
SPACE_TOKEN = "[SPACE]"  # replaces every space, and also ends every line
UNKNOWN_TOKEN = "[UNK]"
STOP_TOKEN = "[STOP]"
# Empty lyrics are fed as this single id with this mask (id 0 is `[STOP]` in upstream's vocabulary).
EMPTY_LYRICS_ID, EMPTY_LYRICS_MASK = 0, 0
# Section tags with a token of their own in the upstream vocabulary.
STRUCTURE_TAGS: tuple[str, ...] = (
    "[start]", "[intro]", "[verse]", "[chorus]", "[bridge]", "[outro]", "[end]", "[inst]", "[solo]",
    "[hook]", "[pre-chorus]", "[break]",
)  # fmt: skip


def language_tag(language: str) -> str:
    """Tag token of a base language code: zh is tagged `[zh-cn]`, the others `[<code>]`."""
    return "[zh-cn]" if language == "zh" else f"[{language}]"


@dataclass(frozen=True)
class TokenizedLine:
    """One stripped lyric line and how it was encoded."""

    text: str
    detected_language: str  # `detect_language` output, before any fallback ("" for an empty line)
    language: str  # language whose normaliser and tag were used ("" for an empty line)
    is_structure_tag: bool
    token_ids: tuple[int, ...]  # language tag + BPE ids, without the line end; () if empty or failed
    error: str | None = None  # why normalisation or BPE failed (the line is then left out)


class LyricTokenizer:
    """Upstream's lyric tokenizer (language detection + normalisation + BPE) over one vocabulary.

    The vocabulary is a `tokenizers` JSON file: upstream's `vocab.json` (6693 ids) or a small one
    from `build_tiny_lyric_vocab`. Special ids are looked up by name, so both work.
    """

    def __init__(self, tokenizer: Tokenizer, source: str) -> None:
        required = [START_TOKEN, SPACE_TOKEN, UNKNOWN_TOKEN] + [language_tag(lang) for lang in SUPPORTED_LANGUAGES]
        missing = [token for token in required if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"lyric vocabulary {source} lacks the tokens {missing}")
        self._tokenizer = tokenizer
        self.source = source
        self.start_id: int = tokenizer.token_to_id(START_TOKEN)
        self.line_end_id: int = tokenizer.token_to_id(SPACE_TOKEN)

    @classmethod
    def from_file(cls, vocab_path: str | Path) -> LyricTokenizer:
        path = Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"lyric vocabulary not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"lyric vocabulary {path} is not a valid tokenizers file: {error}") from error
        return cls(tokenizer, str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids (incl. added tokens): the lyric encoder's embedding rows."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, language: str) -> list[int]:
        """Language tag + BPE ids of one line normalised for `language` (a base code, e.g. "zh")."""
        normalized = normalize_line(text, language)
        tagged = (language_tag(language) + normalized).replace(" ", SPACE_TOKEN)
        return self._tokenizer.encode(tagged).ids

    def tokenize_line(self, line: str) -> TokenizedLine:
        """Detect, normalise and encode one line (stripped first), without start or line end."""
        text = line.strip()
        if not text:
            return TokenizedLine(text, "", "", False, ())
        detected = detect_language(text)
        is_structure_tag = STRUCTURE_TAG.match(text) is not None
        if is_structure_tag or detected not in SUPPORTED_LANGUAGES:
            language = FALLBACK_LANGUAGE
        else:
            language = detected
        try:
            ids = self.encode(text, language)
        except Exception as error:  # noqa: BLE001 - upstream drops the line on any encode error
            logger.warning("lyric line %r (%s) left out: %s", text, language, error)
            reason = f"{type(error).__name__}: {error}"
            return TokenizedLine(text, detected, language, is_structure_tag, (), reason)
        return TokenizedLine(text, detected, language, is_structure_tag, tuple(ids))

    def tokenize(self, lyrics: str) -> list[int]:
        """Token ids of whole lyrics: `[START]`, then each line's ids and the line end."""
        ids = [self.start_id]
        for line in lyrics.split("\n"):
            encoded = self.tokenize_line(line)
            if encoded.error is None:
                ids += [*encoded.token_ids, self.line_end_id]
        return ids

    def token_ids_and_mask(self, lyrics: str) -> tuple[list[int], list[int]]:
        """The pipeline's lyric inputs: ids and an all-ones mask, or `[0]`/`[0]` for empty lyrics."""
        if not lyrics:
            return [EMPTY_LYRICS_ID], [EMPTY_LYRICS_MASK]
        ids = self.tokenize(lyrics)
        return ids, [1] * len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text of ids (tags kept, `[SPACE]` shown as a space), for debugging and tests."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=False).replace(" ", "")
        return text.replace(SPACE_TOKEN, " ").replace(STOP_TOKEN, "")

