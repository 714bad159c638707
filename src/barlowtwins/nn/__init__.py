"""Torch modules and autograd functions the core builds on: exact cross-process sums and
batch norm over the global batch (:mod:`.distributed`), a fast CPU weight gradient for
convolutions with tiny outputs (:mod:`.convolution`), and a first convolution fixed to whiten
its input patches (:mod:`.whitening`)."""
