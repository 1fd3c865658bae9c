"""What the card's kernels do that a meta forward pass does not: the attention kernel an
RTX 3060 picks, cuDNN's RNNs, a convolution's workspace, cuBLAS's workspace. Each module
holds one rule and says where it comes from; ``SimulatedBackend.capture()`` runs them."""
