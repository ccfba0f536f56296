"""Keel app."""
