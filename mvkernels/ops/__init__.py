"""One module per op; each holds the kernels' launcher, the torch.library registration and a PyTorch reference."""
