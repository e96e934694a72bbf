"""Wire structs for what clients send and receive (OpenAI shapes)."""
