"""Framework-free algorithms: plain torch/numpy, never ray, fastapi or vllm."""
