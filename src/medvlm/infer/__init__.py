"""Inference: batched / streamed generation (``engine``) and the one-shot ``medvlm chat`` verb."""
