"""Training objectives: ELBO with KL balancing, contrastive divergence, NCE, score matching, regularizers."""
