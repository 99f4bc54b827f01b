"""Tools for the demo, the end-to-end tests and the benchmark: not part of the toot package."""
