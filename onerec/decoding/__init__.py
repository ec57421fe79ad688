"""Pure, trie-constrained beam search over a step function."""
