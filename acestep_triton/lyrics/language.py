"""Per-line language detection, giving the same answer as upstream ACE-Step's `get_lang`.

Upstream runs a vendored `LangSegment` (configured with the 97 py3langid languages as its
filter list) over each lyric line and keeps the language with the most characters, except that
when English comes first and any other language was seen, the runner-up wins. This module
re-implements only the part of that segmenter one line with that fixed configuration reaches:

1. Spans of special text are masked, in this order, by placeholders `⑥<kind><index:06d>⑥`:
   `<xx>..</xx>` tags, Hangul, Thai and Cyrillic runs, numbers followed by punctuation, Latin
   runs (incl. French/Vietnamese letters), `'..'`/`".."` quotes and bracket pairs. A pattern
   whose only match is the whole line leaves it unmasked. The placeholder is built from `\\w`
   characters (⑥ is a digit-like word char, not `\\d`), so later patterns see it as a word.
2. The masked line is walked left to right. Plain text is split at punctuation runs, glued to
   its neighbour while too short to classify, then classified by py3langid on a cleaned copy
   (punctuation runs -> one space, repeated characters collapsed: "Hello" is seen as "Helo",
   which is why "Hello world" comes out as Xhosa). Short CJK pieces follow the zh/ja
   tie-breaking rules (ja wins ties because it precedes zh in the filter list; kana means ja;
   otherwise the decision may wait for the next piece). Masked spans get their fixed language
   (Hangul ko, Thai th, Cyrillic ru), a py3langid guess per sentence (Latin, long quotes), the
   first piece's language (numbers), or their tag name (`<xx>`).
3. Each kept piece adds its length (twice for zh) to its language's count; pieces that only
   hold punctuation or digits take the previous piece's language. A piece still waiting for a
   zh/ja decision at the end of the line is dropped. No piece at all means zh.

Tags other than language codes are dropped, except upstream's four SSML tags (`<number>`,
`<telephone>`, `<currency>`, `<date>`), whose content is read out in Chinese and counted as zh.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

from acestep_triton.lyrics.numbers_zh import SSML_READINGS, UnreadableNumberError

# The py3langid language set; upstream passes it (in this order) as LangSegment's filters.
LANGID_LANGUAGES: tuple[str, ...] = (
    "af", "am", "an", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da",
    "de", "dz", "el", "en", "eo", "es", "et", "eu", "fa", "fi", "fo", "fr", "ga", "gl", "gu",
    "he", "hi", "hr", "ht", "hu", "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn",
    "ko", "ku", "ky", "la", "lb", "lo", "lt", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt",
    "nb", "ne", "nl", "nn", "no", "oc", "or", "pa", "pl", "ps", "pt", "qu", "ro", "ru", "rw",
    "se", "si", "sk", "sl", "sq", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "ug", "uk",
    "ur", "vi", "vo", "wa", "xh", "zh", "zu",
)  # fmt: skip
# Upstream tests tag names by substring against the dash-joined list, so "i" or "a-b" pass.
_LANGUAGES_JOINED = "-".join(LANGID_LANGUAGES)
# A piece is kept when its language is in the list or is a substring of the first entry.
_FIRST_LANGUAGE = LANGID_LANGUAGES[0]

ZH, JA, EN = "zh", "ja", "en"
# zh/ja undecided pieces: "first|second|…" (the preferred reading first).
_ZH_THEN_JA = f"{ZH}|{JA}"
_JA_THEN_ZH = f"{JA}|{ZH}"
_UNDECIDED_MARK = "…"
# Below this py3langid probability a short CJK piece takes the filter list's zh/ja preference.
_CJK_PRIORITY_THRESHOLD = 0.89
# ...and that preference is whichever of ja/zh comes first in the filter list.
_PREFERRED_CJK = JA if _LANGUAGES_JOINED.find(JA) < _LANGUAGES_JOINED.find(ZH) else ZH
_CJK_CONFIDENT = 0.90
_CJK_SHORT = 5  # CJK pieces up to this many cleaned characters get the zh/ja rules
_SHORT_PIECE = 2  # cleaned pieces this short are glued onto the next one when possible

_PLACEHOLDER = re.compile(r"(⑥\$*\d+[\d]{6,}⑥)")
_PUNCTUATION_RUN = re.compile(r"([^\w\s]+)")
_SENTENCE = re.compile(r"(.*?[。.?？!！]+[\n]{,1})")
_KANA = re.compile(r"[\u3040-\u309F\u30A0-\u30FF]+")
_INNER_CAPITAL = re.compile(r"(?<!\b)([A-Z])")

_FRENCH_LETTERS = "àáâãäåæçèéêëìíîïðñòóôõöùúûüýþÿ"
_VIETNAMESE_LETTERS = "đơưăáàảãạắằẳẵặấầẩẫậéèẻẽẹếềểễệíìỉĩịóòỏõọốồổỗộớờởỡợúùủũụứừửữựôâêơưỷỹ"


def _script_run(letters: str) -> re.Pattern[str]:
    """Runs of `letters` with an optional opening quote/bracket and trailing punctuation/space."""
    return re.compile(rf"(([【《（(“‘\"']*[{letters}]+[\W\s]*)+)")


# Masked spans, in masking order. Placeholder kinds are upstream's, so placeholders have the
# same characters (and lengths) wherever a later pattern sees them.
_TAGGED = re.compile(r"(<([a-zA-Z|-]*)>(.*?)<\/*[a-zA-Z|-]*>)")
_HANGUL = _script_run("\uac00-\ud7a3")
_THAI = _script_run("\u0e00-\u0e7f")
_CYRILLIC = _script_run("А-Яа-яЁё")
_NUMBER = re.compile(r"(\W*\d+\W+\d*\W*\d*)")
_LATIN = _script_run("a-zA-Z" + _FRENCH_LETTERS + _VIETNAMESE_LETTERS)
_QUOTED = re.compile(r"([\"'])(.*?)(\1)")
_BRACKETED = re.compile(r"([\n]*[【《（(“‘])([^【《（(“‘’”)）》】]{3,})([’”)）》】][\W\s]*[\n]{,1})")

Match = str | tuple[str, ...]  # what `findall` gives: the text, or the groups


@dataclass
class _Piece:
    language: str
    text: str
    score: float
    tagged: bool = False  # came from a `<tag>`: never merged with its neighbours


def _cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def _clean_for_langid(text: str) -> str:
    """Punctuation runs -> one space, runs of one repeated character -> that character."""
    text = re.sub(r"(.*?)([^\w]+)", r"\1 ", text)
    return re.sub(r"(.)\1+", r"\1", text).strip()


def _without_punctuation(text: str) -> str:
    return re.sub(r"([^\w\s]+)", "", text.replace("\n", "")).strip()


def _only_digits(text: str) -> bool:
    """True for text that is empty or all digits once punctuation and spaces are removed."""
    return not re.sub(r"\d+", "", _without_punctuation(text))


def _split_inner_capitals(text: str) -> str:
    """English pieces are stored as "i Phone " (a space before inner capitals, one at the end)."""
    return _INNER_CAPITAL.sub(r" \1", text).strip("-") + " "


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)


def _classify(text: str) -> tuple[str, float]:
    """py3langid's `classify`, with its feature product taken over the features the text has: a
    line has a few dozen of the model's 7480, and the dense product (a BLAS call per line, threaded
    and contended in a busy server) was ~90 % of tokenising lyrics. The result differs from the
    dense product only by float32 summation order (~1e-6 on the probability)."""
    identifier = _identifier()
    features = identifier.instance2fv(text)
    present = np.flatnonzero(features)
    scores = features[present].astype(identifier.nb_ptc.dtype) @ identifier.nb_ptc[present] + identifier.nb_pc
    probabilities = identifier.norm_probs(scores)
    best = int(np.argmax(probabilities))
    return identifier.nb_classes[best], round(float(probabilities[best]), 3)


class _LineSegmenter:
    """One pass over one line: masks, walks the pieces and counts characters per language."""

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []
        self.waiting: list[_Piece] = []
        self.counts: dict[str, int] = {}
        self.masked: dict[str, tuple[Callable[[Match], None], Match]] = {}
        self.at_line_end = False

    # -- masking ---------------------------------------------------------------------------
    def mask(self, text: str) -> str:
        maskers: tuple[tuple[str, re.Pattern[str], Callable[[Match], None]], ...] = (
            ("$1", _TAGGED, self._tagged),
            ("$6", _HANGUL, partial(self._fixed, "ko")),
            ("$8", _THAI, partial(self._fixed, "th")),
            ("$7", _CYRILLIC, partial(self._fixed, "ru")),
            ("00", _NUMBER, self._number),
            ("$5", _LATIN, self._latin),
            ("$3", _QUOTED, self._quoted),
            ("$4", _BRACKETED, self._quoted),
        )
        for kind, pattern, handler in maskers:
            matches = pattern.findall(text)
            if len(matches) == 1 and _joined(matches[0]) == text:
                continue
            for index, match in enumerate(matches):
                key = f"⑥{kind}{index:06d}⑥"
                text = pattern.sub(key, text, count=1)
                self.masked[key] = (handler, match)
        return text

    # -- walking ---------------------------------------------------------------------------
    def walk(self, text: str, is_root: bool) -> None:
        segments = _PLACEHOLDER.split(text)
        for index, segment in enumerate(segments):
            if is_root:
                self.at_line_end = index >= len(segments) - 1
            if _PLACEHOLDER.match(segment):
                handler, match = self.masked[segment]
                handler(match)
            else:
                self._plain(segment)

    def _plain(self, segment: str) -> None:
        parts = _PUNCTUATION_RUN.split(segment)
        last = len(parts) - 1
        for index, text in enumerate(parts):
            if not text:
                continue
            is_last = index >= last
            following = "" if is_last else parts[index + 1]
            if not is_last and (not _without_punctuation(text) or not _without_punctuation(following)):
                parts[index + 1] = text + following
                continue
            cleaned = _clean_for_langid(re.sub(r"\d+", "", re.sub(r"(⑥\d{6,}⑥)", "", text)))
            if not is_last and len(cleaned) <= _SHORT_PIECE:
                parts[index + 1] = text + following
                continue
            language, score = _classify(cleaned)
            if language != ZH and all(_cjk(c) for c in re.sub(r"\s", "", cleaned)):
                language, score = ZH, 1
            if len(cleaned) <= _CJK_SHORT and any(_cjk(c) for c in cleaned):
                language = self._short_cjk(text, cleaned, language, score, is_last)
            self._add(language, text, score)

    def _short_cjk(self, text: str, cleaned: str, language: str, score: float, is_last: bool) -> str:
        if score < _CJK_PRIORITY_THRESHOLD:
            language = _PREFERRED_CJK
        if _KANA.search(cleaned):
            return JA
        if len(cleaned) > _SHORT_PIECE and score > _CJK_CONFIDENT:
            return language
        if is_last and self.at_line_end:
            return ZH if len(cleaned) <= 1 else language
        previous = self.pieces[-1].language if self.pieces else None
        undecided = (
            _ZH_THEN_JA
            if language == ZH or (len(cleaned) <= _SHORT_PIECE and previous == ZH)
            else _JA_THEN_ZH
        )
        # `text` holds a CJK character, so it is never blank here.
        if re.sub(r"\s+", "", text)[-1] in "。.":
            related = bool(previous) and (previous in undecided or undecided in previous)
            return previous if related else language
        return f"{undecided}|{_UNDECIDED_MARK}"

    # -- handlers for masked spans ---------------------------------------------------------
    def _tagged(self, match: Match) -> None:
        _, tag, content = match
        if tag in SSML_READINGS and tag not in _LANGUAGES_JOINED:
            self._add(ZH, SSML_READINGS[tag](content), 1.0, tagged=True)
        else:
            self._add(tag, content, 1.0, tagged=True)

    def _fixed(self, language: str, match: Match) -> None:
        self._add(language, match[0], 1.0)

    def _number(self, match: Match) -> None:
        language = self.pieces[0].language if self.pieces else ZH
        self._add(language, _joined(match), 0.0)

    def _latin(self, match: Match) -> None:
        for sentence in _SENTENCE.split(match[0]):
            if sentence.strip():
                language, score = _classify(_clean_for_langid(sentence))
                self._add(language, sentence, score)

    def _quoted(self, match: Match) -> None:
        text = _joined(match)
        if _PLACEHOLDER.findall(text):
            self.walk(text, is_root=False)
            return
        cleaned = _clean_for_langid(match[1])
        if len(cleaned) <= _CJK_SHORT:
            self._plain(text)
        else:
            language, score = _classify(cleaned)
            self._add(language, text, score)

    # -- keeping pieces --------------------------------------------------------------------
    def _add(self, language: str, text: str, score: float, tagged: bool = False) -> None:
        if not text.strip():
            return
        language = language.lower()
        if language == EN:
            text = _split_inner_capitals(text)
        # Kept pieces never hold an undecided "zh|ja" language; waiting ones always do.
        if self.waiting:
            undecided = self.waiting.pop()
            if language in undecided.language:
                language = language.split("|")[0]
                resolved = language
            else:
                resolved = undecided.language.split("|")[0]
            previous_language = self._keep(resolved, undecided.text, undecided.score, undecided.tagged)
        else:
            previous_language = self.pieces[-1].language if self.pieces else None
        if (
            "|" in language
            and previous_language
            and previous_language not in language
            and _UNDECIDED_MARK not in language
        ):
            language = language.split("|")[0]
        if "|" in language:
            self.waiting.append(_Piece(language, text, score, tagged))
        else:
            self._keep(language, text, score, tagged)

    def _keep(self, language: str, text: str, score: float, tagged: bool) -> str:
        """Store a decided piece (merging it into the previous one when allowed); returns its language."""
        last = self.pieces[-1] if self.pieces else None
        if not tagged and last is not None and not last.tagged:
            if _only_digits(text):
                language = last.language
            if last.language == language:
                self._count(language, text)
                last.text += text
                return language
            if _only_digits(last.text):
                text = last.text + text
                self.pieces.pop()
        if language in LANGID_LANGUAGES or "?" in language or language in _FIRST_LANGUAGE:
            self.pieces.append(_Piece(language, text, score, tagged))
            self._count(language, text)
        return language

    def _count(self, language: str, text: str) -> None:
        if "|" not in language:
            weight = 2 if language == ZH else 1
            self.counts[language] = self.counts.get(language, 0) + weight * len(text)


def _joined(match: Match) -> str:
    return match if isinstance(match, str) else "".join(match)


def language_counts(line: str) -> list[tuple[str, int]]:
    """(language, character count) of one lyric line, most first (ties in order of appearance)."""
    segmenter = _LineSegmenter()
    text = segmenter.mask(_PLACEHOLDER.sub("", line))
    segmenter.walk(text, is_root=True)
    if not segmenter.counts:
        return [(ZH, 0)]
    return sorted(segmenter.counts.items(), key=lambda item: item[1], reverse=True)


def detect_language(line: str) -> str:
    """Upstream `get_lang`: the most used language of a stripped, non-empty line.

    English only wins when it is the only language seen; otherwise the runner-up is taken.
    Lines upstream's segmenter crashes on (non-ASCII digits in an SSML tag) are en, as upstream.
    """
    try:
        counts = language_counts(line)
    except UnreadableNumberError:
        return EN
    if len(counts) > 1 and counts[0][0] == EN:
        return counts[1][0]
    return counts[0][0]
