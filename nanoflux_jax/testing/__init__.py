"""Offline test fixtures: tiny random diffusers FLUX pipelines (needs torch)."""
