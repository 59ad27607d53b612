"""Where acknowledged records go."""
