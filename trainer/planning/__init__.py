"""Planning a run before it starts: memory estimates, hardware peaks, scaling laws, the sweep."""
