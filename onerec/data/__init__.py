"""Interaction sources, session building and item embeddings."""
