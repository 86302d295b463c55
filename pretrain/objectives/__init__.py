"""Self-supervised objectives: build inputs/labels from a token batch and compute the loss."""
