"""The GMCN model (plugin ``gmcn``): Gaussian convolution, pooling rescale, the network."""
