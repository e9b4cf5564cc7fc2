"""Trainer service: serves `TrainingService` and the writes of `ModelService`
(forward_backward, custom losses, optim_step, the checkpoint tree).

Not built yet: the package exists so the layout of design.md is in place; it serves nothing.
"""
