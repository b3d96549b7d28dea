"""``deltaserve``: run the server, and drive it from the terminal.

    deltaserve serve [--model PATH] [--data-dir DIR] [--listen HOST:PORT] [--metrics-listen HOST:PORT] [--config FILE]
    deltaserve upload PATH --name NAME
    deltaserve generate [--delta NAME[@VERSION]] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K]
                        [--seed S] [--json] PROMPT
    deltaserve deltas list | show NAME | delete NAME[@VERSION]
    deltaserve tenants create NAME [--admin] | list | delete NAME | rotate-key NAME
    deltaserve recover-admin-key [--data-dir DIR] [--tenant NAME]      (offline: the server stopped)

Client commands take ``--server HOST:PORT`` (env DELTASERVE_SERVER, default 127.0.0.1:50051) and
``--api-key KEY`` (env DELTASERVE_API_KEY; else, for a local server, the admin key file of the
default data dir). ``tenants rotate-key`` rewrites that key file when the rotation revoked the key it
held (an admin rotating their own key is not locked out). Errors print one line on stderr and exit 1
(2 for bad usage); no tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .admin_key import key_path

DEFAULT_SERVER = "127.0.0.1:50051"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def default_data_dir() -> Path:
    from .config import ServerConfig

    return Path(os.environ.get("DELTASERVE_DATA_DIR", ServerConfig().data_dir))


def _local_key_file(args) -> Path | None:
    """The admin key file of the default data dir, when the server is on this host."""
    return key_path(default_data_dir()) if args.server.rpartition(":")[0] in LOCAL_HOSTS else None


def _api_key(args) -> str:
    if args.api_key:
        return args.api_key
    key_file = _local_key_file(args)
    if key_file is not None and key_file.is_file():
        return key_file.read_text().strip()
    raise CliError(f"no API key: pass --api-key, set DELTASERVE_API_KEY, or run a local server whose "
                   f"key file {key_path(default_data_dir())} exists")


def _key_works(client, key: str) -> bool:
    import grpc

    try:
        client.with_key(key).list_deltas(page_size=1)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise
    return True


def _client(args):
    from .client import Client

    return Client(args.server, _api_key(args), timeout=args.timeout)


# ---- upload ---------------------------------------------------------------------------------------
class Progress:
    """``upload name: [#####.....] 52% 1.3/2.5 MB`` on stderr, redrawn in place on a terminal."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.tty = stream.isatty()

    def update(self, done: int, total: int) -> None:
        total = max(1, total)
        if not self.tty and done < total:
            return
        frac = min(1.0, done / total)
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        end = "\n" if done >= total else ""
        self.stream.write(f"\rupload {self.label}: [{bar}] {frac:4.0%} {done / 1e6:.1f}/{total / 1e6:.1f} MB{end}")
        self.stream.flush()


def cmd_upload(args) -> int:
    labels = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep:
            raise CliError(f"--label {item!r}: expected KEY=VALUE")
        labels[k] = v
    path = Path(args.path)
    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    with _client(args) as client:
        v = client.upload(args.name, path, format=args.format, description=args.description, labels=labels,
                          on_progress=Progress(args.name).update)
    print(f"name={v.name} version={v.version} digest={v.digest}")
    return 0


# ---- generate -------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .client import FINISH_NAMES

    text, ids, logprobs, last = [], [], [], None
    with _client(args) as client:
        for chunk in client.generate(args.prompt, delta=args.delta or "", max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     seed=args.seed, logprobs=args.json, ignore_eos=args.ignore_eos):
            last = chunk
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    if last is None:
        raise CliError("the server closed the stream without output")
    reason = FINISH_NAMES[last.finish_reason]
    if args.json:
        print(json.dumps({"request_id": last.request_id, "text": "".join(text), "token_ids": ids,
                          "logprobs": logprobs, "finish_reason": reason, "delta_version": last.delta_version,
                          "usage": {"prompt_tokens": last.usage.prompt_tokens,
                                    "completion_tokens": last.usage.completion_tokens,
                                    "total_tokens": last.usage.total_tokens},
                          "timings": {"queue_seconds": last.timings.queue_seconds,
                                      "ttft_seconds": last.timings.ttft_seconds,
                                      "total_seconds": last.timings.total_seconds}}))
    else:
        sys.stdout.write("\n")
    return 0


# ---- deltas / tenants -----------------------------------------------------------------------------
def _kinds(v) -> str:
    from .client import KIND_NAMES

    return ",".join(KIND_NAMES[k] for k in v.kinds) or "-"


def cmd_deltas(args) -> int:
    if args.action != "list" and not args.name:
        raise CliError(f"deltas {args.action} needs a NAME")
    with _client(args) as client:
        if args.action == "list":
            rows = client.list_deltas()
            print(f"{'NAME':32} {'LATEST':>6} {'KINDS':20} {'BYTES':>12} {'REQUESTS':>9}")
            for d in rows:
                v = d.versions[-1]
                print(f"{d.name:32} {v.version:>6} {_kinds(v):20} {v.size_bytes:>12} {d.usage.requests:>9}")
        elif args.action == "show":
            d = client.get_delta(args.name)
            print(f"name={d.name} requests={d.usage.requests} tokens={d.usage.tokens_generated}")
            for v in d.versions:
                print(f"  version={v.version} digest={v.digest} kinds={_kinds(v)} bytes={v.size_bytes} "
                      f"max_rank={v.max_rank} description={json.dumps(v.description)}")
        else:
            print(f"deleted {client.delete_delta(args.name)} version(s) of {args.name}")
    return 0


def cmd_tenants(args) -> int:
    if args.action != "list" and not args.name:
        raise CliError(f"tenants {args.action} needs a NAME")
    with _client(args) as client:
        if args.action == "list":
            print(f"{'NAME':32} {'ADMIN':5} {'MAX_DELTAS':>10} {'REQ/MIN':>8} {'CONCURRENT':>10}")
            for t in client.list_tenants():
                q = t.quotas
                print(f"{t.name:32} {'yes' if t.admin else 'no':5} {q.max_deltas:>10} {q.requests_per_minute:>8} "
                      f"{q.max_concurrent:>10}")
        elif args.action == "create":
            tenant, key = client.create_tenant(args.name, admin=args.admin)
            print(f"tenant={tenant.name} api_key={key}")
        elif args.action == "rotate-key":
            # The local key file follows a rotation that revoked the key it holds (an admin rotating their own
            # key, maybe with another admin's): known by asking the server before and after.
            key_file = _local_key_file(args)
            held = key_file.read_text().strip() if key_file is not None and key_file.is_file() else ""
            held_worked = bool(held) and _key_works(client, held)
            key = client.rotate_key(args.name)
            print(f"tenant={args.name} api_key={key}")
            if held_worked and not _key_works(client, held):
                from .admin_key import write_key

                print(f"updated the key file {write_key(key_file.parent, key)}")
        else:
            client.delete_tenant(args.name)
            print(f"deleted tenant {args.name}")
    return 0


def cmd_recover_admin_key(args) -> int:
    from .admin_key import RecoveryRefused, recover

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        path, created = recover(data_dir, args.tenant)
    except RecoveryRefused as exc:
        raise CliError(str(exc)) from None
    print(f"{'created admin tenant' if created else 'new key for admin tenant'} {args.tenant}; key file {path} "
          f"(the previous key of {args.tenant} no longer works)")
    return 0


def cmd_serve(args) -> int:
    from .app import serve
    from .config import ServerConfig

    data_dir = args.data_dir or os.environ.get("DELTASERVE_DATA_DIR")  # the same default the client commands use
    overrides = {"model_path": args.model, "data_dir": data_dir, "listen": args.listen,
                 "metrics_listen": args.metrics_listen, "log_level": args.log_level}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = ServerConfig.from_file(args.config, **overrides) if args.config else ServerConfig.from_dict(overrides)
    return serve(config)


# ---- parsing --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("DELTASERVE_SERVER", DEFAULT_SERVER), help="HOST:PORT")
    common.add_argument("--api-key", default=os.environ.get("DELTASERVE_API_KEY"), help="tenant API key")
    common.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    parser = argparse.ArgumentParser(prog="deltaserve", description="Multi-tenant delta serving over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--model", help="HF causal LM folder (config, safetensors, tokenizer); default: the demo model")
    p.add_argument("--data-dir", help="catalogue, blobs, demo model and admin key live here "
                   "(env DELTASERVE_DATA_DIR, default ./.deltaserve)")
    p.add_argument("--listen", help="gRPC HOST:PORT")
    p.add_argument("--metrics-listen", help="Prometheus HOST:PORT")
    p.add_argument("--config", help="TOML or JSON file of ServerConfig fields")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("upload", parents=[common], help="upload a delta (folder, archive or file)")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--format", default="auto", choices=("auto", "peft", "adapterhub", "opendelta", "bitfit", "native"))
    p.add_argument("--description", default="")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("generate", parents=[common], help="generate text, streamed")
    p.add_argument("prompt")
    p.add_argument("--delta", help="NAME or NAME@VERSION")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("deltas", parents=[common], help="list, show or delete your deltas")
    p.add_argument("action", choices=("list", "show", "delete"))
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_deltas)

    p = sub.add_parser("tenants", parents=[common], help="manage tenants (admin key)")
    p.add_argument("action", choices=("create", "list", "delete", "rotate-key"))
    p.add_argument("name", nargs="?")
    p.add_argument("--admin", action="store_true", help="create: give the admin role")
    p.set_defaults(func=cmd_tenants)

    p = sub.add_parser("recover-admin-key", help="offline, with the server stopped: issue a new admin key "
                       "into the data dir's key file")
    p.add_argument("--data-dir", help="the server's data dir (env DELTASERVE_DATA_DIR, default ./.deltaserve)")
    p.add_argument("--tenant", default="admin", help="the admin tenant (created if missing; default admin)")
    p.set_defaults(func=cmd_recover_admin_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"deltaserve: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("deltaserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            code = exc.code()
            detail = exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "Cancelling all calls" in detail:  # gRPC's, at a drain's end
                detail = f"server shutting down: it ended the call before it finished ({detail})"
            elif code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in detail:
                # the server's own UNAVAILABLE says why ("server shutting down: ..."); gRPC's means no connection
                detail = f"cannot reach the server at {args.server} ({detail})" if hasattr(args, "server") else detail
            print(f"deltaserve: error: {code.name}: {detail}", file=sys.stderr)
        else:
            from delta_store.errors import DeltaServeError
            from .config import ConfigError

            if not isinstance(exc, (DeltaServeError, ConfigError, OSError, ValueError)):
                raise
            print(f"deltaserve: error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
