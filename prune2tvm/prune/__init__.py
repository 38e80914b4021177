"""Pruning: schedules, masks that hold through fine-tuning, and the methods built on them."""
