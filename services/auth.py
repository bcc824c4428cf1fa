"""Bearer API keys, required unless a demo explicitly turns them off.

Keys come from an environment variable (comma-separated) or a file with one key per line (a
mounted k8s Secret), read where the ingress runs; they never travel in the Serve config.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from contract.errors import UserError
from contract.keys import parse_keys
from services.config import AuthConfig

logger = logging.getLogger("ray.serve")

INSECURE_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  --insecure-no-auth: this API answers ANYONE who can reach it, without an API key.\n"
    "!!  Use it for local demos only; never expose this server beyond the local machine.\n" + "!" * 78
)


def load_api_keys(config: AuthConfig) -> list[str]:
    keys = parse_keys(os.environ.get(config.api_keys_env, ""))
    if config.api_keys_file is not None:
        if not config.api_keys_file.is_file():
            raise UserError(f"auth.api_keys_file {config.api_keys_file} does not exist (mount the Secret there, or fix the path)")
        keys += parse_keys(config.api_keys_file.read_text())
    return keys


class ApiKeys:
    def __init__(self, config: AuthConfig):
        self.required = not config.insecure_no_auth
        # Only digests are kept: fixed-length values to compare, and no key in a replica's memory dump.
        self._digests = [_digest(k) for k in load_api_keys(config)] if self.required else []
        if self.required and not self._digests:
            raise UserError(
                f"no API keys: set {config.api_keys_env}=key1,key2 or auth.api_keys_file=<file>, "
                "or pass --insecure-no-auth for a local demo"
            )
        if not self.required:
            logger.warning(INSECURE_BANNER)

    def allows(self, authorization: str | None) -> bool:
        if not self.required:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        # Digests of one length, each compared in constant time: timing reveals neither a key, nor
        # its length, nor which one matched.
        presented = _digest(key.strip())
        matches = [hmac.compare_digest(presented, digest) for digest in self._digests]
        return any(matches)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
