"""OneRec-style generative recommendation: tokenizer, encoder-decoder model, training, decoding, evaluation."""

__version__ = "0.1.0"
