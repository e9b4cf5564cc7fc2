"""Gateway: the one endpoint users see (gRPC and OpenAI-compatible HTTP), routing sampling
to samplers pinned to the head checkpoint and training to the trainer.

Not built yet: the package exists so the layout of design.md is in place; it serves nothing.
"""
