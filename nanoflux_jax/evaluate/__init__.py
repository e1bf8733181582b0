"""Evaluation: the shapes-world attribute classifier and toy metrics."""
