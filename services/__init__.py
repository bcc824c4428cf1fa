"""Ray Serve applications: the model behind an OpenAI-compatible API."""
