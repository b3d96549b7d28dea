"""How a CLI command reaches the server: its API key (flag, environment, or a local server's admin key file) and
the client built from it; ``CliError``, the failure ``cli.main`` prints as one line."""
from __future__ import annotations

from .cli_keys import local_key_file, local_key_files


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def api_key(args) -> str:
    """--api-key / DELTASERVE_API_KEY; else, for a server on this machine, the admin key of its data dir:
    DELTASERVE_DATA_DIR's, the one the server on that port noted (server/discovery.py), ./.deltaserve's."""
    if args.api_key:
        return args.api_key
    key_file = local_key_file(args)
    if key_file is not None:
        return key_file.read_text().strip()
    tried = [str(f) for f in local_key_files(args)]
    where = f" (looked in {', '.join(tried)})" if tried else ""
    raise CliError(f"no API key: pass --api-key or set DELTASERVE_API_KEY{where}")


def client_for(args):
    from .client import Client

    return Client(args.server, api_key(args), timeout=args.timeout)
