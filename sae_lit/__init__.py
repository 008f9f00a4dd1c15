"""sae_lit: TopK sparse autoencoders on language-model activations, with PyTorch Lightning."""
from sae_lit.model.formats import load_sae
from sae_lit.model.sae import ForwardOutput, TopKSAE

__all__ = ["ForwardOutput", "TopKSAE", "load_sae"]
