"""Headway: train language models with rewards."""
