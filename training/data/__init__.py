"""Data as the ranks see it: formats and templates, the tokenize-once cache, packing, the sampler."""
