"""The published checkpoint layout: validation, download, and where the lyric vocabulary lives.

The layout is the one of `ACE-Step/ACE-Step-v1-3.5B` on the Hugging Face hub, loaded unchanged.
The lyric vocabulary is not part of it (upstream ships it with its code): it is looked up
beside the checkpoint, or given explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HUB_REPO_ID = "ACE-Step/ACE-Step-v1-3.5B"
LYRIC_VOCAB_ENV = "ACESTEP_LYRIC_VOCAB"
CHECKPOINT_ENV = "ACESTEP_CHECKPOINT"
DEPLOYMENT_CHECKPOINT = f"${CHECKPOINT_ENV}"
LYRIC_VOCAB_FILENAME = "lyric_vocab.json"
UPSTREAM_LYRIC_VOCAB_URL = (
    "https://raw.githubusercontent.com/ace-step/ACE-Step/d612523f50e252c0e138e68ae75b06223f96e934/"
    "acestep/models/lyrics_utils/vocab.json"
)

TRANSFORMER_DIR = "ace_step_transformer"
DCAE_DIR = "music_dcae_f8c8"
VOCODER_DIR = "music_vocoder"
TEXT_ENCODER_DIR = "umt5-base"

# folder -> (weights file, config keys a loader needs)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    TRANSFORMER_DIR: (
        "diffusion_pytorch_model.safetensors",
        ("inner_dim", "num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
         "out_channels", "patch_size", "text_embedding_dim", "lyric_encoder_vocab_size", "lyric_hidden_size"),
    ),
    DCAE_DIR: (
        "diffusion_pytorch_model.safetensors",
        ("in_channels", "latent_channels", "decoder_block_out_channels", "decoder_block_types"),
    ),
    VOCODER_DIR: (
        "diffusion_pytorch_model.safetensors",
        ("dims", "depths", "upsample_rates", "upsample_kernel_sizes", "n_mels", "hop_length"),
    ),
    TEXT_ENCODER_DIR: ("model.safetensors", ("d_model", "num_layers", "num_heads", "vocab_size")),
}
TEXT_TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """The checkpoint directory cannot be used; the message names the path and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint directory."""

    root: Path

    @property
    def transformer(self) -> Path:
        return self.root / TRANSFORMER_DIR

    @property
    def dcae(self) -> Path:
        return self.root / DCAE_DIR

    @property
    def vocoder(self) -> Path:
        return self.root / VOCODER_DIR

    @property
    def text_encoder(self) -> Path:
        return self.root / TEXT_ENCODER_DIR

    def config(self, folder: str) -> dict:
        return json.loads((self.root / folder / "config.json").read_text())


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def validate_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Check every component folder, weights file and config key a loader needs."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    problems = []
    for folder, (weights, keys) in COMPONENTS.items():
        comp = root / folder
        if not comp.is_dir():
            problems.append(f"missing folder {folder}/")
            continue
        if not (comp / "config.json").is_file():
            problems.append(f"missing {folder}/config.json")
        else:
            config = _read_config(comp / "config.json")
            missing = [k for k in keys if k not in config]
            if missing:
                problems.append(f"{folder}/config.json lacks {', '.join(missing)}")
        if not (comp / weights).is_file():
            problems.append(f"missing {folder}/{weights}")
    if (root / TEXT_ENCODER_DIR).is_dir() and not (root / TEXT_ENCODER_DIR / TEXT_TOKENIZER_FILE).is_file():
        problems.append(f"missing {TEXT_ENCODER_DIR}/{TEXT_TOKENIZER_FILE}")
    if problems:
        raise CheckpointError(f"checkpoint {root} is incomplete: " + "; ".join(problems))
    return Checkpoint(root)


def deployment_checkpoint(parameter: str) -> Checkpoint:
    """The checkpoint a Triton model serves, from its CHECKPOINT parameter: a directory, or
    DEPLOYMENT_CHECKPOINT ("$ACESTEP_CHECKPOINT", what the committed model_repository/ holds), which
    names the environment variable the deployment sets to its checkpoint directory."""
    if parameter != DEPLOYMENT_CHECKPOINT:
        return validate_checkpoint(parameter)
    if not os.environ.get(CHECKPOINT_ENV):
        raise CheckpointError(f"the model's CHECKPOINT is {DEPLOYMENT_CHECKPOINT} but {CHECKPOINT_ENV} is not set; "
                              f"set it to the checkpoint directory this deployment serves")
    return validate_checkpoint(os.environ[CHECKPOINT_ENV])


def find_lyric_vocab(checkpoint: Checkpoint, explicit: str | os.PathLike | None = None) -> Path:
    """The lyric BPE vocabulary: explicit path, then $ACESTEP_LYRIC_VOCAB, then <checkpoint>/lyric_vocab.json."""
    candidates = [Path(p) for p in (explicit, os.environ.get(LYRIC_VOCAB_ENV)) if p]
    candidates.append(checkpoint.root / LYRIC_VOCAB_FILENAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no lyric vocabulary found (looked at {', '.join(map(str, candidates))}); upstream ships it as "
        f"acestep/models/lyrics_utils/vocab.json in the ACE-Step code: copy it to "
        f"{checkpoint.root / LYRIC_VOCAB_FILENAME} or set {LYRIC_VOCAB_ENV}"
    )


def download_lyric_vocab(checkpoint: Checkpoint, url: str = UPSTREAM_LYRIC_VOCAB_URL) -> Path:
    """Fetch upstream's lyric vocabulary next to the checkpoint (atomic); a clear error when offline."""
    import urllib.error
    import urllib.request

    target = checkpoint.root / LYRIC_VOCAB_FILENAME
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        json.loads(data)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not download the lyric vocabulary from {url}: {exc}") from None
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def download_checkpoint(local_dir: str | os.PathLike, repo_id: str = HUB_REPO_ID) -> Checkpoint:
    """Fetch the published checkpoint with huggingface_hub; a clear error when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id=repo_id, local_dir=str(local_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"could not download {repo_id} into {local_dir}: {type(exc).__name__}. This machine may be "
            f"offline; download it elsewhere and pass its directory as the checkpoint"
        ) from None
    checkpoint = validate_checkpoint(path)
    if not (checkpoint.root / LYRIC_VOCAB_FILENAME).is_file():
        download_lyric_vocab(checkpoint)
    return checkpoint
