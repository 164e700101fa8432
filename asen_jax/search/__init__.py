"""Attribute-specific image search: FAISS indexes of a catalog, built and queried with a checkpoint."""
