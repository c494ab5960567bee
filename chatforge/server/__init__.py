"""The chatforge server: OpenAI-compatible API (api), continuous batching (scheduler), storage (db)."""
