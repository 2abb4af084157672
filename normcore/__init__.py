"""normcore: normalization kernels."""
