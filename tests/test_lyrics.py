"""Lyric tokenizer: id parity with upstream ACE-Step v1 on the golden data, tiny vocabulary, errors.

Expected values in the tables below were produced by upstream's own code (commit d612523:
`VoiceBpeTokenizer.preprocess_text`, `LangSegment` + `get_lang`) with the library versions pinned
in requirements.txt; the golden files hold the pipeline's own output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from acestep_triton.lyrics import LyricTokenizer, build_tiny_lyric_vocab, detect_language, normalize_line
from acestep_triton.lyrics.language import _classify, _identifier, language_counts
from acestep_triton.lyrics.tokenizer import SUPPORTED_LANGUAGES, language_tag
from acestep_triton.preprocess import warm_up

WHOLE_LYRICS_CASES = ("a_euler_apg_erg", "b_heun_cfg_noerg", "e_empty_lyrics")


@pytest.fixture(scope="module")
def tokenizer(lyric_vocab: Path) -> LyricTokenizer:
    return LyricTokenizer.from_file(lyric_vocab)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LyricTokenizer:
    return LyricTokenizer.from_file(build_tiny_lyric_vocab(tmp_path_factory.mktemp("lyrics") / "vocab.json"))


def test_special_ids_of_upstream_vocabulary(tokenizer: LyricTokenizer) -> None:
    assert (tokenizer.start_id, tokenizer.line_end_id, tokenizer.vocab_size) == (261, 2, 6693)


def test_golden_table_rows(tokenizer: LyricTokenizer, golden_dir: Path) -> None:
    rows = json.loads((golden_dir / "lyric_tokenizer_table.json").read_text(encoding="utf-8"))["rows"]
    assert len(rows) >= 24
    mismatches = []
    for row in rows:
        line = tokenizer.tokenize_line(row["line"])
        got = {
            "token_ids": tokenizer.tokenize(row["line"]),
            "get_lang_raw": line.detected_language,
            "lang_passed_to_encode": line.language,
            "structure_tag": line.is_structure_tag,
            "tokenize_error": line.error,
        }
        expected = {key: row[key] for key in got}
        if got != expected:
            mismatches.append((row["line"], {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}))
    assert not mismatches, mismatches


@pytest.mark.parametrize("case", WHOLE_LYRICS_CASES)
def test_golden_whole_lyrics(tokenizer: LyricTokenizer, golden_dir: Path, case: str) -> None:
    record = json.loads((golden_dir / f"{case}.json").read_text(encoding="utf-8"))
    lyrics = record["call_kwargs"]["lyrics"]
    with safe_open(str(golden_dir / f"{case}.safetensors"), framework="numpy") as tensors:
        expected_ids = tensors.get_tensor("lyric_token_ids")[0].tolist()
        expected_mask = tensors.get_tensor("lyric_mask")[0].tolist()
    assert tokenizer.token_ids_and_mask(lyrics) == (expected_ids, expected_mask)
    if lyrics:
        assert tokenizer.tokenize(lyrics) == record["lyric_token_ids"]
    for call in record["lyric_encode_calls"]:
        assert tokenizer.tokenize_line(call["text"]).language == call["lang"]
        assert tokenizer.encode(call["text"], call["lang"]) == call["ids"]


def test_empty_lyrics_and_lines(tokenizer: LyricTokenizer) -> None:
    start, end = tokenizer.start_id, tokenizer.line_end_id
    assert tokenizer.token_ids_and_mask("") == ([0], [0])
    assert tokenizer.tokenize("") == [start, end]
    assert tokenizer.token_ids_and_mask("  \n") == ([start, end, end], [1, 1, 1])
    verse = tokenizer.tokenize("[verse]")[1:-1]
    assert tokenizer.tokenize("[verse]\r\n\n[verse]") == [start, *verse, end, end, *verse, end]


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("That will be $20 sir.", "en", "that will be twenty dollars sir."),
        ("That will be 20.15€ sir.", "en", "that will be twenty euro, fifteen cents sir."),
        ("It was the 21st of May", "en", "it was the twenty-first of may"),
        ("100,000 voices", "en", "one hundred thousand voices"),
        ("Mrs. Smith & Dr. Who at 50% #1", "en", "misess smith and doctor who at fifty percent hash one"),
        (
            "Das macht 20,15€, Herr Dr. Müller",
            "de",
            "das macht zwanzig Euro und fünfzehn Cent, herr doktor müller",
        ),
        ("Ceci est un 1er test à 12,5 °", "fr", "ceci est un premier test à douze virgule cinq degrés"),
        ("İSTANBUL ÖZEL ÜÇ 2.000 kişi", "tr", "istanbul özel üç ikibin kişi"),
        # num2words has no Czech ordinals: the whole number step is dropped, as upstream does.
        ("Je 3. den a 1.000 lidí", "cs", "je 3. den a 1.000 lidí"),
        ("Там было 50 солдат, Г-н Иванов", "ru", "там было пятьдесят солдат, господин иванов"),
        ("Había 1.000.000 de estrellas", "es", "había un millón de estrellas"),
        ("Give me 1.5 more", "it", "give me uno virgola cinque more"),
        ("50 katona volt, ez az 1. teszt", "hu", "ötven katona volt, ez az első teszt"),
        ("هناك 50 جنديا", "ar", "هناك خمسون جنديا"),
        ("이것은 1 번째 테스트 50%", "ko", "igeos-eun il beon-jjae teseuteu osib peosenteu"),
        ("小明有2000元，买了3个苹果", "zh", "xiao3ming2you3liang3qian1yuan2,mai3le5san1ge4ping2guo3"),
        ("他的电话是13812345678", "zh", "ta1de5dian4hua4shi4yi1san1ba1yi1er4san1si4wu3liu4qi1ba1"),
        ("1/2的人，12.5%的概率", "zh", "er4fen1zhi1yi1de5ren2,bai3fen1zhi1shi2er4dian3wu3de5gai4lv4"),
        (
            "2002年12月25号 22000人 p2p",
            "zh",
            "er4ling2ling2er4nian2shi2er4yue4er4shi2wu3hao4 er4er4ling2ling2ling2ren2 p2p",
        ),
        ("“你好”，世界！", "zh", ",ni3hao3,,shi4jie4,"),
        ("100元5角", "zh", "yi4bai3yuan2wu3jiao3"),
        ("東京タワーで3時に会いましょう", "ja", "tokyo tower de 3 ji ni aimashou"),
        ("मैं तुमसे प्यार  करता हूँ", "hi", "मैं तुमसे प्यार करता हूँ"),
    ],
)
def test_normalisation_matches_upstream(text: str, language: str, expected: str) -> None:
    assert normalize_line(text, language) == expected


@pytest.mark.parametrize(
    ("line", "language", "counts"),
    [
        ("iPhone 15 Pro Max", "es", [("en", 13), ("es", 7)]),
        ("我爱你 baby", "zh", [("zh", 8), ("en", 5)]),
        ("好的。", "zh", [("zh", 6)]),
        ("雨の日", "ja", [("ja", 3)]),
        ("他说：“我爱你。”", "zh", [("zh", 18)]),
        ("<ja>佐々木</ja>です", "ja", [("ja", 5)]),
        ("<number>123</number> hello", "zh", [("zh", 6), ("en", 6)]),
        ("Привет hello", "ru", [("ru", 7), ("en", 6)]),
        ("สวัสดีครับ ผมรักคุณ", "th", [("th", 19)]),
        ("“東京”", "zh", [("zh", 8)]),
        ("1999", "zh", [("zh", 8)]),
        ("WiFi on", "en", [("en", 9)]),
    ],
)
def test_language_detection_matches_upstream(line: str, language: str, counts: list[tuple[str, int]]) -> None:
    assert language_counts(line) == counts
    assert detect_language(line) == language


def test_ssml_tag_upstream_crashes_on_is_english() -> None:
    assert detect_language("<currency>١٢</currency>") == "en"


SAMPLE_LINES = (
    "我爱你中国",
    "今天是2024年5月1日",
    "東京の夜は美しい",
    "カタカナだけのセンテンス",
    "안녕하세요 여러분",
    "It costs $5.99 today",
    "Привет, как дела?",
    "¿Dónde está la biblioteca?",
)


@pytest.mark.parametrize("line", SAMPLE_LINES)
def test_tiny_vocab_round_trips(tiny_tokenizer: LyricTokenizer, tokenizer: LyricTokenizer, line: str) -> None:
    ids = tiny_tokenizer.tokenize(line)
    encoded = tiny_tokenizer.tokenize_line(line)
    assert max(ids) < tiny_tokenizer.vocab_size
    normalized = normalize_line(line, encoded.language)
    assert tiny_tokenizer.decode(ids) == f"[START]{language_tag(encoded.language)}{normalized} "
    assert tiny_tokenizer.decode(ids) == tokenizer.decode(tokenizer.tokenize(line))


def test_tiny_vocab_is_small_and_complete(tiny_tokenizer: LyricTokenizer) -> None:
    assert tiny_tokenizer.vocab_size < 400
    ids = tiny_tokenizer.tokenize("[chorus]\n🎵 مرحبا नमस्ते ❤️\n\n" + "\n".join(SAMPLE_LINES))
    assert max(ids) < tiny_tokenizer.vocab_size
    assert tiny_tokenizer.decode(tiny_tokenizer.tokenize("[chorus]")) == "[START][en][chorus] "
    assert {tiny_tokenizer.decode([tiny_tokenizer.encode("x", lang)[0]]) for lang in SUPPORTED_LANGUAGES} == {
        language_tag(lang) for lang in SUPPORTED_LANGUAGES
    }


def test_missing_vocab_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vocab.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LyricTokenizer.from_file(missing)


def test_invalid_vocab_names_path(tmp_path: Path) -> None:
    broken = tmp_path / "vocab.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        LyricTokenizer.from_file(broken)


def test_vocab_without_lyric_tokens_is_rejected(tmp_path: Path) -> None:
    vocab = json.loads(build_tiny_lyric_vocab(tmp_path / "tiny.json").read_text(encoding="utf-8"))
    vocab["added_tokens"] = [t for t in vocab["added_tokens"] if t["content"] != "[START]"]
    del vocab["model"]["vocab"]["[START]"]
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match=r"stripped\.json lacks the tokens \['\[START\]'\]"):
        LyricTokenizer.from_file(stripped)


@pytest.mark.parametrize("line", ["Headlights paint the empty road", "Bonjour tout le monde",
                                  "Hola amigos de la noche", "你好世界", "Привет мир",
                                  "Guten Abend, meine Damen und Herren", "hello 123"])
def test_sparse_language_scores_equal_py3langid(line: str) -> None:
    """_classify takes the classifier's product over the line's features only: same language, and
    the probability py3langid gives up to float32 summation order."""
    language, probability = _identifier().classify(line)
    assert _classify(line) == (language, pytest.approx(round(float(probability), 3), abs=1e-3))


def test_warm_up_loads_the_language_identifier(tokenizer: LyricTokenizer) -> None:
    _identifier.cache_clear()
    warm_up(lambda prompt: ([1], [1]), tokenizer.tokenize)
    assert _identifier.cache_info().currsize == 1
