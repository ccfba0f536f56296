"""Keel evals."""
