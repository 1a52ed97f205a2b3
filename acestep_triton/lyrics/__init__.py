"""Lyric tokenisation for ACE-Step v1: language detection, per-language normalisation and BPE.

`LyricTokenizer.from_file(vocab_path).tokenize(lyrics)` gives the ids upstream's pipeline feeds
the lyric encoder. `build_tiny_lyric_vocab` writes a small vocabulary for tiny test checkpoints.
"""

from acestep_triton.lyrics.language import detect_language
from acestep_triton.lyrics.normalize import normalize_line
from acestep_triton.lyrics.tiny_vocab import build_tiny_lyric_vocab
from acestep_triton.lyrics.tokenizer import LyricTokenizer, TokenizedLine

__all__ = ["LyricTokenizer", "TokenizedLine", "build_tiny_lyric_vocab", "detect_language", "normalize_line"]
