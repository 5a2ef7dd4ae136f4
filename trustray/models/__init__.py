"""Model loading (HF id, local path, or a built-in name) and generation engines behind one protocol."""
