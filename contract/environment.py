"""Environment variables that more than one layer reads, named once."""

# The API's keys, comma-separated (services/auth.py); the chat page beside the API uses the first.
API_KEYS_ENV = "DOLLY_API_KEYS"
# The feedback database's URL where it carries a password (a Postgres URL from a k8s Secret): it
# replaces serving's feedback.url (services/config.py) and is `dolly feedback --db`'s default.
FEEDBACK_URL_ENV = "DOLLY_FEEDBACK_URL"
