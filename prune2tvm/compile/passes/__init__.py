"""Relax passes of prune2tvm, one transform per file."""
