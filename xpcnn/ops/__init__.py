"""Array functions that layers are built from: written against the Array API, with faster
NumPy and CuPy kernels behind the one seam ``Backend.fast`` (see :mod:`xpcnn.ops.kernels`)."""
