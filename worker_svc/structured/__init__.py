"""Structured output in the worker: the grammar engine and its matchers (grammar.py), and their part
in a step (grammar_step.py). docs/structured_output.md has the design and the measurements."""
