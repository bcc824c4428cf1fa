"""Environment variables that more than one layer reads, named once."""

# The API's keys, comma-separated (services/auth.py); the chat page beside the API uses the first.
API_KEYS_ENV = "DOLLY_API_KEYS"
