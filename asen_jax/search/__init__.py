"""Attribute-specific image search: per-attribute FAISS indexes of a catalog, and queries."""
