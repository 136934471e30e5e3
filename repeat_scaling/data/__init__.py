"""Data layer: sources -> token store -> repetition plan -> objectives -> batches."""
