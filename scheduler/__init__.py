"""The scheduler: requests, continuous batching under a token budget, the engine loop."""
