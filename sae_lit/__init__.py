"""sae_lit: TopK sparse autoencoders on language-model activations, with PyTorch Lightning."""
from sae_lit.sae import TopKSAE, ForwardOutput

__all__ = ["TopKSAE", "ForwardOutput"]
