"""Evaluation: independent judges of generated images (a digit classifier trained on real digits, a colour
judge) and the toy world's held-out questions (``evaluation.judges``)."""
