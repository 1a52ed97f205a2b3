"""Lyric text normalisation per language, as upstream ACE-Step's lyric tokenizer does it.

Before BPE, upstream (whose cleaners come from Coqui XTTS) rewrites each line for its language:

- ar cs de en es fr hu it ko nl pl pt ru tr zh: drop `"`, lower-case, spell out numbers
  (currencies, decimals, ordinals, cardinals via num2words; zh via `numbers_zh`), expand a few
  abbreviations and symbols into words, collapse whitespace; then zh becomes tone-numbered pinyin
  (pypinyin) and ko is romanised (hangul-romanize, academic rules).
- ja: romaji from cutlet (MeCab with unidic-lite), lower-cased; nothing else.
- hi: lower-cased, whitespace collapsed.

Each of the three rewriting steps (numbers, abbreviations, symbols) is all-or-nothing: when
num2words cannot handle a number the whole number step leaves the line unchanged, as upstream's
bare `except: pass` does. Currencies are the exception inside that step: they are rewritten one
currency after the other, and the first failing currency stops the remaining ones only.
"""

from __future__ import annotations

import re
from functools import lru_cache

from num2words import num2words

from acestep_triton.lyrics.numbers_zh import normalize_chinese_numbers

CLEANED_LANGUAGES = frozenset(
    {"ar", "cs", "de", "en", "es", "fr", "hu", "it", "ko", "nl", "pl", "pt", "ru", "tr", "zh"}
)
NORMALIZED_LANGUAGES = CLEANED_LANGUAGES | {"ja", "hi"}


def _abbreviation_rules(pairs: str, *, ends_with_dot: bool = True) -> tuple[tuple[re.Pattern[str], str], ...]:
    """"mr=mister;dr=doctor" -> (regex matching "mr." at a word start, "mister"), ..."""
    rules = []
    for pair in filter(None, pairs.split(";")):
        short, long = pair.split("=")
        ending = r"\." if ends_with_dot else r"\b"
        rules.append((re.compile(r"\b" + short + ending, re.IGNORECASE), long))
    return tuple(rules)


# Applied in this order; the longer forms of a prefix (drs, mrs) come where upstream puts them.
ABBREVIATIONS: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "en": _abbreviation_rules(
        "mrs=misess;mr=mister;dr=doctor;st=saint;co=company;jr=junior;maj=major;gen=general;"
        "drs=doctors;rev=reverend;lt=lieutenant;hon=honorable;sgt=sergeant;capt=captain;"
        "esq=esquire;ltd=limited;col=colonel;ft=fort"
    ),
    "es": _abbreviation_rules(
        "sra=señora;sr=señor;dr=doctor;dra=doctora;st=santo;co=compañía;jr=junior;ltd=limitada"
    ),
    "fr": _abbreviation_rules("mme=madame;mr=monsieur;dr=docteur;st=saint;co=compagnie;jr=junior;ltd=limitée"),
    "de": _abbreviation_rules("fr=frau;dr=doktor;st=sankt;co=firma;jr=junior"),
    "pt": _abbreviation_rules(
        "sra=senhora;sr=senhor;dr=doutor;dra=doutora;st=santo;co=companhia;jr=júnior;ltd=limitada"
    ),
    "it": _abbreviation_rules("sig=signore;dr=dottore;st=santo;co=compagnia;jr=junior;ltd=limitata"),
    "pl": _abbreviation_rules("p=pani;m=pan;dr=doktor;sw=święty;jr=junior"),
    "ar": (),
    "zh": (),
    "cs": _abbreviation_rules("dr=doktor;ing=inženýr;p=pan"),
    "ru": _abbreviation_rules("г-жа=госпожа;г-н=господин;д-р=доктор", ends_with_dot=False),
    "nl": _abbreviation_rules("dhr=de heer;mevr=mevrouw;dr=dokter;jhr=jonkheer"),
    "tr": _abbreviation_rules("b=bay;byk=büyük;dr=doktor"),
    "hu": _abbreviation_rules("dr=doktor;b=bácsi;nőv=nővér"),
    "ko": (),
}

# Words for & @ % # $ £ ° (in that order), each inserted with a space on both sides.
_SYMBOL_CHARS = "&@%#$£°"
_SYMBOL_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("and", "at", "percent", "hash", "dollar", "pound", "degree"),
    "es": ("y", "arroba", "por ciento", "numeral", "dolar", "libra", "grados"),
    "fr": ("et", "arobase", "pour cent", "dièse", "dollar", "livre", "degrés"),
    "de": ("und", "at", "prozent", "raute", "dollar", "pfund", "grad"),
    "pt": ("e", "arroba", "por cento", "cardinal", "dólar", "libra", "graus"),
    "it": ("e", "chiocciola", "per cento", "cancelletto", "dollaro", "sterlina", "gradi"),
    "pl": ("i", "małpa", "procent", "krzyżyk", "dolar", "funt", "stopnie"),
    "ar": ("و", "على", "في المئة", "رقم", "دولار", "جنيه", "درجة"),
    "zh": ("和", "在", "百分之", "号", "美元", "英镑", "度"),
    "cs": ("a", "na", "procento", "křížek", "dolar", "libra", "stupně"),
    "ru": ("и", "собака", "процентов", "номер", "доллар", "фунт", "градус"),
    "nl": ("en", "bij", "procent", "hekje", "dollar", "pond", "graden"),
    "tr": ("ve", "at", "yüzde", "diyez", "dolar", "sterlin", "derece"),
    "hu": ("és", "kukac", "százalék", "kettőskereszt", "dollár", "font", "fok"),
    "ko": ("그리고", "에", "퍼센트", "번호", "달러", "파운드", "도"),
}

ORDINAL_SUFFIXES: dict[str, re.Pattern[str]] = {
    "en": re.compile(r"([0-9]+)(st|nd|rd|th)"),
    "es": re.compile(r"([0-9]+)(º|ª|er|o|a|os|as)"),
    "fr": re.compile(r"([0-9]+)(º|ª|er|re|e|ème)"),
    "de": re.compile(r"([0-9]+)(st|nd|rd|th|º|ª|\.(?=\s|$))"),
    "pt": re.compile(r"([0-9]+)(º|ª|o|a|os|as)"),
    "it": re.compile(r"([0-9]+)(º|°|ª|o|a|i|e)"),
    "pl": re.compile(r"([0-9]+)(º|ª|st|nd|rd|th)"),
    "ar": re.compile(r"([0-9]+)(ون|ين|ث|ر|ى)"),
    "cs": re.compile(r"([0-9]+)\.(?=\s|$)"),
    "ru": re.compile(r"([0-9]+)(-й|-я|-е|-ое|-ье|-го)"),
    "nl": re.compile(r"([0-9]+)(de|ste|e)"),
    "tr": re.compile(r"([0-9]+)(\.|inci|nci|uncu|üncü|\.)"),
    "hu": re.compile(r"([0-9]+)(\.|adik|edik|odik|edik|ödik|ödike|ik)"),
    "ko": re.compile(r"([0-9]+)(번째|번|차|째)"),
}

# What num2words puts between the main unit and the cents; whole amounts are cut there.
_CENTS_SEPARATOR = {
    "en": ", ", "es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e ", "pl": ", ",
    "cs": ", ", "ru": ", ", "nl": ", ", "ar": ", ", "tr": ", ", "hu": ", ", "ko": ", ",
}  # fmt: skip

# Tried in this order. USD/GBP prefer the sign in front, EUR the sign behind.
_CURRENCIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GBP", re.compile(r"£[0-9.,]*[0-9]+|[0-9.,]*[0-9]+£")),
    ("USD", re.compile(r"\$[0-9.,]*[0-9]+|[0-9.,]*[0-9]+\$")),
    ("EUR", re.compile(r"[0-9.,]*[0-9]+€|€[0-9.,]*[0-9]+")),
)
# Thousands separators: "," in en/ru, "." elsewhere. The "." in the second pattern is upstream's
# unescaped wildcard, kept: only the dots of whatever it matches are removed.
_COMMA_GROUPED = re.compile(r"\b\d{1,3}(,\d{3})*(\.\d+)?\b")
_DOT_GROUPED = re.compile(r"\b\d{1,3}(.\d{3})*(\,\d+)?\b")
_DECIMAL = re.compile(r"([0-9]+[.,][0-9]+)")
_INTEGER = re.compile(r"[0-9]+")
_WHITESPACE = re.compile(r"\s+")


def _num2words_language(language: str) -> str:
    return "cz" if language == "cs" else language


def _currency_words(amount_text: str, currency: str, language: str) -> str:
    amount = float(re.sub(r"[^\d.]", "", amount_text.replace(",", ".")))
    words = num2words(amount, to="currency", currency=currency, lang=_num2words_language(language))
    if amount.is_integer():
        cut = words.rfind(_CENTS_SEPARATOR[language])
        if cut != -1:
            words = words[:cut]
    return words


def spell_out_numbers(text: str, language: str) -> str:
    """Numbers, amounts and ordinals of a lower-cased line as words; raises where num2words does."""
    if language == "zh":
        return normalize_chinese_numbers(text)
    n2w_language = _num2words_language(language)
    if language in ("en", "ru"):
        text = _COMMA_GROUPED.sub(lambda m: m.group(0).replace(",", ""), text)
    else:
        text = _DOT_GROUPED.sub(lambda m: m.group(0).replace(".", ""), text)
    try:
        for currency, pattern in _CURRENCIES:
            text = pattern.sub(lambda m: _currency_words(m.group(0), currency, language), text)
    except Exception:  # noqa: BLE001 - upstream stops at the first currency num2words rejects
        pass
    if language != "tr":
        text = _DECIMAL.sub(lambda m: num2words(float(m.group(1).replace(",", ".")), lang=n2w_language), text)
    text = ORDINAL_SUFFIXES[language].sub(
        lambda m: num2words(int(m.group(1)), ordinal=True, lang=n2w_language), text
    )
    return _INTEGER.sub(lambda m: num2words(int(m.group(0)), lang=n2w_language), text)


def expand_abbreviations(text: str, language: str) -> str:
    for pattern, words in ABBREVIATIONS[language]:
        text = pattern.sub(words, text)
    return text


def expand_symbols(text: str, language: str) -> str:
    for symbol, words in zip(_SYMBOL_CHARS, _SYMBOL_WORDS[language]):
        text = text.replace(symbol, f" {words} ")
    return text.strip()


def clean_multilingual(text: str, language: str) -> str:
    """The shared cleaner of the 15 "multilingual" languages (before zh/ko transliteration)."""
    text = text.replace('"', "")
    if language == "tr":
        text = text.replace("İ", "i").replace("Ö", "ö").replace("Ü", "ü")
    text = text.lower()
    try:
        text = spell_out_numbers(text, language)
    except Exception:  # noqa: BLE001 - any num2words failure leaves the numbers as digits, as upstream
        pass
    text = expand_abbreviations(text, language)
    text = expand_symbols(text, language)
    return _WHITESPACE.sub(" ", text)


def to_pinyin(text: str) -> str:
    """Han characters -> pinyin with tone numbers (neutral tone 5), other text unchanged."""
    import pypinyin

    syllables = pypinyin.pinyin(text, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True)
    return "".join(candidates[0] for candidates in syllables)


@lru_cache(maxsize=1)
def _hangul_transliterator():
    from hangul_romanize import Transliter
    from hangul_romanize.rule import academic

    return Transliter(academic)


@lru_cache(maxsize=1)
def _romaji_converter():
    import cutlet

    return cutlet.Cutlet()


def normalize_line(text: str, language: str) -> str:
    """A lyric line as the BPE sees it for `language` (base code: "zh", not "zh-cn")."""
    if language in CLEANED_LANGUAGES:
        text = clean_multilingual(text, language)
        if language == "zh":
            text = to_pinyin(text)
        elif language == "ko":
            text = _hangul_transliterator().translit(text)
        return text
    if language == "ja":
        return _romaji_converter().romaji(text).lower()
    if language == "hi":
        return _WHITESPACE.sub(" ", text.lower())
    raise ValueError(f"language {language!r} has no lyric normaliser (supported: {sorted(NORMALIZED_LANGUAGES)})")
