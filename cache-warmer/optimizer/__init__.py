"""The cold-start optimizer: what to keep warm and which graph steps to wake ahead (decide.py, pure), run
against a serving backend (loop.py)."""
