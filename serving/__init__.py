"""Everything on the Ray Serve side: the application, its control plane, state, scoring and log."""
