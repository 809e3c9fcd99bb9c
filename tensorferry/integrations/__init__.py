"""Engine integrations: build engine models on tensors the daemon serves."""
