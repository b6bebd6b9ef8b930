"""What runs and keeps a network on devices: the device mesh, multi-process start-up, checkpoints."""
