"""mgpr: multi-GPU raster inference."""
