"""The HTTP layer: the FastAPI app, uploads, error mapping, metrics, guards, the demo, OIP v2."""
