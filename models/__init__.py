"""Model definitions written directly in MLX, one file per architecture."""
