"""Plans, run specs, registration, launching on Ray, and the `slab` CLI."""
