"""The HTTP server over the engine (`pyramoe serve`)."""
