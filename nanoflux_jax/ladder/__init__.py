"""The compression ladder: rung kinds, the stage they pass on, the run."""
