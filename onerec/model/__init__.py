"""The OneRec encoder-decoder: layers, sparse MoE, `encode` and `decode_step`."""
