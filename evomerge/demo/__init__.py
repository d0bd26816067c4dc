"""Model families to merge: a tiny random one for tests, and the SmolLM2 demo family."""
