"""Sampler service: serves `SamplingService` for every model of a base from one copy of its
weights, with exact per-token logprobs and live reloads of new heads.

Not built yet: the package exists so the layout of design.md is in place; it serves nothing.
"""
