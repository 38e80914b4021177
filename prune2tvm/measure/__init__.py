"""Measurements: latency of several backends side by side, and accuracy of each."""
