"""Crop modes shared by the center-of-mass kernels (CPU and CUDA)."""

NO_CROP, BOX, CIRCLE = 0, 1, 2
