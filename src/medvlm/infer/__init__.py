"""Inference: batched / streamed generation (``engine``) and many-request batches (``batching``)."""
