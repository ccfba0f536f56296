"""Workflow modules: each builds one LangGraph ``StateGraph`` from small node functions."""
