"""Evaluation building blocks: statistics (stats), text-quality proxies (text) and bias probes (bias).

These are pure functions over outcomes, replies and small model callables; the `chatforge eval` stage
composes them into a report.
"""
