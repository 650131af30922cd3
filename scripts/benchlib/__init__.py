"""scripts/bench's modules: where each kind of change goes is in README.md beside this file."""
