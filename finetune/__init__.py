"""Keel finetune."""
