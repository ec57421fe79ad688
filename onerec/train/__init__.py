"""Training recipes, one per stage."""
