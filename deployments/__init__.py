"""Long-lived services outside Serve (the drift webhook) and deployment wiring (work pools)."""
