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

Deliberate gap: the four SSML tags (`<number>`, `<telephone>`, `<currency>`, `<date>`), which
upstream rewrites into Chinese numerals before counting them as zh, are treated like any other
unknown tag (not counted). Lyrics do not use them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

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
_MIN_CLASSIFIED = 2  # pieces this short are glued onto the next one when possible

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


@dataclass
class _Piece:
    language: str
    text: str
    score: float
    symbol: object = None  # None for plain text, True for a language tag, the tag name otherwise


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
    language, probability = _identifier().classify(text)
    return language, round(float(probability), 3)


class _LineSegmenter:
    """One pass over one line: masks, walks the pieces and counts characters per language."""

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []
        self.waiting: list[_Piece] = []
        self.counts: dict[str, int] = {}
        self.masked: dict[str, tuple[Callable[[object], None], object]] = {}
        self.at_line_end = False

    # -- masking ---------------------------------------------------------------------------
    def mask(self, text: str) -> str:
        maskers: tuple[tuple[str, re.Pattern[str], Callable[[object], None]], ...] = (
            ("$1", re.compile(r"(<([a-zA-Z|-]*)>(.*?)<\/*[a-zA-Z|-]*>)"), self._tagged),
            ("$6", _script_run("\uac00-\ud7a3"), self._fixed("ko")),
            ("$8", _script_run("\u0e00-\u0e7f"), self._fixed("th")),
            ("$7", _script_run("А-Яа-яЁё"), self._fixed("ru")),
            ("00", re.compile(r"(\W*\d+\W+\d*\W*\d*)"), self._number),
            ("$5", _script_run("a-zA-Z" + _FRENCH_LETTERS + _VIETNAMESE_LETTERS), self._latin),
            ("$3", re.compile(r"([\"'])(.*?)(\1)"), self._quoted),
            ("$4", re.compile(r"([\n]*[【《（(“‘])([^【《（(“‘’”)）》】]{3,})([’”)）》】][\W\s]*[\n]{,1})"),
             self._quoted),
        )  # fmt: skip
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
            if not is_last and len(cleaned) <= _MIN_CLASSIFIED:
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
        if len(cleaned) > _MIN_CLASSIFIED and score > _CJK_CONFIDENT:
            return language
        if is_last and self.at_line_end:
            return ZH if len(cleaned) <= 1 else language
        previous = self.pieces[-1].language if self.pieces else None
        undecided = (
            _ZH_THEN_JA
            if language == ZH or (len(cleaned) <= _MIN_CLASSIFIED and previous == ZH)
            else _JA_THEN_ZH
        )
        # `text` holds a CJK character, so it is never blank here.
        if re.sub(r"\s+", "", text)[-1] in "。.":
            related = bool(previous) and (previous in undecided or undecided in previous)
            return previous if related else language
        return f"{undecided}|{_UNDECIDED_MARK}"

    # -- handlers for masked spans ---------------------------------------------------------
    def _tagged(self, match: object) -> None:
        _, tag, content = match  # type: ignore[misc]
        self._add(tag, content, 1.0, True if tag in _LANGUAGES_JOINED else tag)

    def _fixed(self, language: str) -> Callable[[object], None]:
        def handler(match: object) -> None:
            self._add(language, match[0], 1.0)  # type: ignore[index]

        return handler

    def _number(self, match: object) -> None:
        language = self.pieces[0].language if self.pieces else ZH
        self._add(language, match, 0.0)  # type: ignore[arg-type]

    def _latin(self, match: object) -> None:
        for sentence in _SENTENCE.split(match[0]):  # type: ignore[index]
            if sentence.strip():
                language, score = _classify(_clean_for_langid(sentence))
                self._add(language, sentence, score)

    def _quoted(self, match: object) -> None:
        text = "".join(match)  # type: ignore[arg-type]
        if _PLACEHOLDER.findall(text):
            self.walk(text, is_root=False)
            return
        cleaned = _clean_for_langid(match[1])  # type: ignore[index]
        if len(cleaned) <= _CJK_SHORT:
            self._plain(text)
        else:
            language, score = _classify(cleaned)
            self._add(language, text, score)

    # -- keeping pieces --------------------------------------------------------------------
    def _add(self, language: str, text: str, score: float, symbol: object = None) -> None:
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
            previous_language = self._keep(resolved, undecided.text, undecided.score, undecided.symbol)
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
            self.waiting.append(_Piece(language, text, score, symbol))
        else:
            self._keep(language, text, score, symbol)

    def _keep(self, language: str, text: str, score: float, symbol: object) -> str:
        """Store a decided piece (merging it into the previous one when allowed); returns its language."""
        last = self.pieces[-1] if self.pieces else None
        if symbol is None and last is not None and last.symbol is None:
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
            self.pieces.append(_Piece(language, text, score, symbol))
            self._count(language, text)
        return language

    def _count(self, language: str, text: str) -> None:
        if "|" not in language:
            weight = 2 if language == ZH else 1
            self.counts[language] = self.counts.get(language, 0) + weight * len(text)


def _joined(match: object) -> str:
    return match if isinstance(match, str) else "".join(match)  # type: ignore[arg-type]


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
    """
    counts = language_counts(line)
    if len(counts) > 1 and counts[0][0] == EN:
        return counts[1][0]
    return counts[0][0]
