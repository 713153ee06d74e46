"""Array functions that layers are built from: written against the Array API, with faster
NumPy and CuPy kernels behind the one seam ``fast_kernels`` (see :mod:`xpcnn.ops.kernels`)."""
