"""Data: the internal Sample format, readers for every LLaVA-Med file, images, collate, download, convert, synth."""
