"""A tiny random checkpoint in the published layout: the embedded default and the tests' model.

Every component keeps its real architecture and only shrinks widths, so the serving code
paths (ERG blocks, the lyric Conformer, 8x DCAE compression, the vocoder's 512 hop) are the
real ones. Building is seeded: the same seed gives the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from acestep_triton.checkpoint import (
    DCAE_DIR,
    LYRIC_VOCAB_FILENAME,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VOCODER_DIR,
    Checkpoint,
    validate_checkpoint,
)

# 20 layers because ERG-diffusion acts on blocks 15-19; 6 Conformer blocks because ERG-lyric acts on 4-5.
TINY_TRANSFORMER = {
    "attention_head_dim": 16,
    "in_channels": 8,
    "inner_dim": 32,
    "lyric_hidden_size": 32,
    "max_height": 16,
    "max_position": 32768,
    "max_width": 32768,
    "mlp_ratio": 2.5,
    "num_attention_heads": 2,
    "num_layers": 20,
    "out_channels": 8,
    "patch_size": [16, 1],
    "rope_theta": 1000000.0,
    "speaker_embedding_dim": 512,
    "ssl_encoder_depths": [1, 1],
    "ssl_latent_dims": [32, 24],
    "ssl_names": ["mert", "m-hubert"],
    "text_embedding_dim": 32,
    "_tiny_lyric_encoder": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 6},
}
TINY_DCAE = {
    "in_channels": 2,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 8, 16, 16],
    "decoder_block_out_channels": [8, 8, 16, 16],
    "encoder_layers_per_block": [1, 1, 1, 1],
    "decoder_layers_per_block": [1, 1, 1, 1],
    "encoder_qkv_multiscales": [[], [], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [5], [5]],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}
TINY_VOCODER = {
    "depths": [1, 1, 1, 1],
    "dims": [8, 8, 16, 16],
    "drop_path_rate": 0.0,
    "f_max": 16000,
    "f_min": 40,
    "hop_length": 512,
    "input_channels": 128,
    "kernel_sizes": [7],
    "n_fft": 2048,
    "n_mels": 128,
    "num_mels": 16,
    "post_conv_kernel_size": 13,
    "pre_conv_kernel_size": 13,
    "resblock_dilation_sizes": [[1, 3, 5]],
    "resblock_kernel_sizes": [3],
    "sampling_rate": 44100,
    "upsample_initial_channel": 128,
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4, 4],
    "upsample_rates": [4, 4, 2, 2, 2, 2, 2],
    "use_template": False,
    "win_length": 2048,
}
# 12 layers because ERG-tag acts on blocks 8-9.
TINY_UMT5 = {
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 12,
    "num_decoder_layers": 1,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
    "scalable_attention": True,
}
TEXT_CORPUS = (
    "pop, rock, electronic, upbeat, energetic, dance, synth, house, techno, ambient",
    "rap, hip hop, trap-pop, fast-paced, emotional, melodic, passionate, high energy",
    "jazz, smooth, relaxing, instrumental, piano, saxophone, lo-fi, chill, acoustic guitar",
    "classical, orchestral, strings, cinematic, epic, dark, sad, happy, female vocals, male vocals",
    "country, folk, blues, soul, funk, reggae, metal, punk, indie, k-pop, j-pop, latin, 120 bpm",
)


def _train_text_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A SentencePiece-style unigram tokenizer wrapped as T5TokenizerFast (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.75
    )
    tok.train_from_iterator(list(TEXT_CORPUS) * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    wrapped = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    wrapped.save_pretrained(out_dir)


def _save_component(model, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random checkpoint (a few MB, seconds on CPU) and return its directory.

    Built into a temporary sibling and renamed, so a crash never leaves a half checkpoint.
    """
    from diffusers import AutoencoderDC
    from transformers import UMT5Config, UMT5EncoderModel

    from acestep_triton.lyrics import LyricTokenizer, build_tiny_lyric_vocab
    from acestep_triton.models.transformer import ACEStepTransformer
    from acestep_triton.models.vocoder import ADaMoSHiFiGAN

    out = Path(out_dir)
    if out.exists():
        return validate_checkpoint(out).root
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        vocab_path = build_tiny_lyric_vocab(tmp / LYRIC_VOCAB_FILENAME)
        lyric_vocab_size = LyricTokenizer.from_file(vocab_path).vocab_size

        torch.manual_seed(seed)
        _save_component(ACEStepTransformer(lyric_encoder_vocab_size=lyric_vocab_size, **TINY_TRANSFORMER),
                        tmp / TRANSFORMER_DIR)
        torch.manual_seed(seed + 1)
        _save_component(AutoencoderDC(**TINY_DCAE), tmp / DCAE_DIR)
        torch.manual_seed(seed + 2)
        _save_component(ADaMoSHiFiGAN(**TINY_VOCODER), tmp / VOCODER_DIR)

        text_dir = tmp / TEXT_ENCODER_DIR
        _train_text_tokenizer(text_dir, vocab_size=256)
        torch.manual_seed(seed + 3)
        vocab_size = len(json.loads((text_dir / "tokenizer.json").read_text())["model"]["vocab"])
        UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TINY_UMT5)).save_pretrained(text_dir)
        validate_checkpoint(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def tiny_checkpoint(cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """The embedded default: the tiny checkpoint, built once into a cache directory."""
    cache = Path(cache_dir or os.environ.get("ACESTEP_CACHE", Path.home() / ".cache" / "acestep_triton"))
    return validate_checkpoint(build_tiny_checkpoint(cache / "tiny-ckpt"))
