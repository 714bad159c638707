"""Torch modules and autograd functions the core builds on: exact cross-process sums and
batch norm over the global batch (:mod:`.distributed`), and a fast CPU weight gradient for
convolutions with tiny outputs (:mod:`.convolution`)."""
