"""The contract's Example 1 (seed README), written out here as the tests' independent copy, and a short
variant of it for the tests that run real generations."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_1 = {
    "checkpoint_path": "/workspace/ace-step-api/checkpoints/ACE-Step-v1-3.5B",
    "audio_duration": 60.0,
    "prompt": "pop, rock, electronic, upbeat, energetic",
    "lyrics": "[verse]\nWalking through the city streets at night\nLights are shining bright\n\n"
    "[chorus]\nThis is our time to shine\nTogether we'll make it fine",
    "infer_step": 60,
    "guidance_scale": 15.0,
    "scheduler_type": "euler",
    "cfg_type": "apg",
    "omega_scale": 10.0,
    "actual_seeds": [1234567890],
    "guidance_interval": 0.5,
    "guidance_interval_decay": 0.0,
    "min_guidance_scale": 3.0,
    "use_erg_tag": True,
    "use_erg_lyric": True,
    "use_erg_diffusion": True,
    "oss_steps": [],
}


def short_request(checkpoint: str | Path, **changes) -> dict:
    """Example 1 of the REST contract on `checkpoint`, cut to 5 s of audio, one lyric line and 4
    steps, with `changes`."""
    return EXAMPLE_1 | {
        "checkpoint_path": str(checkpoint),
        "audio_duration": 5.0,
        "lyrics": "[verse]\nWalking through the city streets at night",
        "infer_step": 4,
    } | changes
