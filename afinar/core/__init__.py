"""Shared by every stage: settings and defaults, run.json, the output layout, atomic writes, errors, prompts."""
