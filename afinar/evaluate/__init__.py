"""Answering and judging: greedy decoding, the contrast test, facts, the misconception probe, perplexity, reports."""
