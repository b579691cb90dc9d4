"""On-device agent loop with validated, sandboxed tools."""
