"""Keel agents."""
