"""Detection primitives on tensors: structures, priors and assignment, box coders, losses."""
