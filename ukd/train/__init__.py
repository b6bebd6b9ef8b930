"""Training: losses, optimizer, state, steps, writers, profiling, and the loop."""
