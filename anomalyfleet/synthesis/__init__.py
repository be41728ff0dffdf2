"""Synthetic defects: region sampling, procedural generators (Perlin blend, CutPaste), AnoGen on
diffusers, and libraries of generated images with masks made in shards on Ray."""
