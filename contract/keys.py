"""API keys as text, read alike by the API (services/auth.py) and the chat page beside it (ui/config.py)."""

from __future__ import annotations


def parse_keys(text: str) -> list[str]:
    """The keys in an environment variable or a file: commas, spaces and line breaks all separate
    them (`key1,key2`, one per line as a mounted k8s Secret holds them), so no key holds either."""
    return text.replace(",", " ").split()
