"""Flow-matching schedulers, guidance and the denoising loop."""
