"""Generated gRPC stubs for proto/ftd/v1 (see proto/generate.py)."""
