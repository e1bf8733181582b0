"""Data: the procedural shapes world and prompt sources."""
