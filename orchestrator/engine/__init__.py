"""The stub engine: a CPU stand-in for a TensorRT-LLM executor (one per engine model)."""
