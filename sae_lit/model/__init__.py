"""The SAE itself, independent of Lightning: TopKSAE and its variants, the sparse kernels, the
losses, and SAE folders on disk (load_sae / export_sae)."""
