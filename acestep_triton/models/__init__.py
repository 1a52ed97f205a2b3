"""Checkpoint-compatible ACE-Step v1 components (one module per published folder)."""
