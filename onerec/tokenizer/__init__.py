"""Balanced residual k-means semantic-ID tokenizer and the catalog it writes."""
