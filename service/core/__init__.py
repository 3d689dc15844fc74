"""The transport-free core: onnxruntime models, dynamic batching, the inference engine."""
