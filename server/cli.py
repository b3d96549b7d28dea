"""``deltaserve``: run the server, and drive it from the terminal.

    deltaserve serve [--model NAME|FOLDER|FILE.gguf] [--data-dir DIR] [--listen HOST:PORT] [--openai-listen ...]
    deltaserve generate [--delta NAME[@VERSION] | --merge NAME=WEIGHT ...] [--greedy] [--stop TEXT]... [--json] PROMPT
    deltaserve chat [--system TEXT] [--delta NAME[@VERSION]] [MESSAGE]      (no MESSAGE: interactive)
    deltaserve upload PATH --name NAME
    deltaserve deltas list | show NAME | delete NAME[@VERSION] | preload NAME[@VERSION] [--host]
    deltaserve tenants create NAME [--admin] | list | delete NAME | rotate-key NAME | quotas NAME [--... N]
    deltaserve recover-admin-key [--data-dir DIR] [--catalogue URL] [--tenant NAME]   (offline: server stopped)

Client commands take ``--server HOST:PORT`` (env DELTASERVE_SERVER, default 127.0.0.1:50051) and
``--api-key KEY`` (env DELTASERVE_API_KEY; else, for a local server, its admin key file: see
``cli_client.api_key``). ``tenants rotate-key`` rewrites that key file when the rotation revoked the key it
held (an admin rotating their own key is not locked out). Errors print one line on stderr and exit 1
(2 for bad usage); no tracebacks. Text from the model written to a terminal shows control characters as
escapes (``\\x1b``), so a model can never move the cursor or retitle the window; piped output is the text
as generated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_client import CliError, client_for
from .cli_generate import cmd_chat, cmd_generate, sampling_flags
from .cli_keys import default_data_dir, key_works, local_key_file
from .terminal import Progress

DEFAULT_SERVER = "127.0.0.1:50051"
ENV_VARS = (
    ("DELTASERVE_SERVER", f"gRPC HOST:PORT of the server for client commands (default {DEFAULT_SERVER})"),
    ("DELTASERVE_API_KEY", "tenant API key for client commands"),
    ("DELTASERVE_DATA_DIR", "data dir of `serve` (default ./.deltaserve); client commands read its admin.key"),
    ("DELTASERVE_KERNELS", "delta kernel backend of `serve`: auto (default), triton or cpu"),
    ("DELTASERVE_CPU_NATIVE", "the CPU backend's C loops: auto (default: built with $CC or cc when present), on, off"),
    ("DELTASERVE_NATIVE_CACHE", "where the C loops are built (default ~/.cache/deltaserve/native)"),
    ("DELTASERVE_CATALOGUE", "catalogue URL of `serve` (postgresql://...; default SQLite in the data dir)"),
    ("DELTASERVE_BLOBS", "blob store of `serve` (s3://bucket/prefix; default files in the data dir)"),
    ("DELTASERVE_REPLICA_ID", "replica name `serve` sends in x-deltaserve-replica (default the host name)"),
    ("DELTASERVE_CUDA_GRAPHS", "1/0: `serve` replays decode steps from CUDA graphs (CUDA devices only; default 0)"),
)
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}
QUOTA_FIELDS = ("max_deltas", "max_delta_bytes", "requests_per_minute", "tokens_per_minute", "max_concurrent")


# ---- upload ---------------------------------------------------------------------------------------
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
    with client_for(args) as client:
        v = client.upload(args.name, path, format=args.format, description=args.description, labels=labels,
                          on_progress=Progress(args.name).update)
    print(f"name={v.name} version={v.version} digest={v.digest}")
    return 0


# ---- deltas / tenants -----------------------------------------------------------------------------
def _kinds(v) -> str:
    from .client import KIND_NAMES

    return ",".join(KIND_NAMES[k] for k in v.kinds) or "-"


def cmd_deltas(args) -> int:
    if args.action != "list" and not args.name:
        raise CliError(f"deltas {args.action} needs a NAME")
    with client_for(args) as client:
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
        elif args.action == "preload":
            from .pb import deltas_pb2

            reply = client.preload_delta(args.name, device=not args.host)
            tier = deltas_pb2.CacheTier.Name(reply.tier).removeprefix("CACHE_TIER_").lower()
            print(f"preloaded {reply.version.name}@{reply.version.version} tier={tier} "
                  f"seconds={reply.load_seconds:.3f}")
        else:
            print(f"deleted {client.delete_delta(args.name)} version(s) of {args.name}")
    return 0


def _quota_line(t) -> str:
    q = t.quotas
    return " ".join(f"{f}={getattr(q, f)}" for f in QUOTA_FIELDS)


def cmd_tenants(args) -> int:
    if args.action != "list" and not args.name:
        raise CliError(f"tenants {args.action} needs a NAME")
    with client_for(args) as client:
        if args.action == "list":
            print(f"{'NAME':32} {'ADMIN':5} {'MAX_DELTAS':>10} {'REQ/MIN':>8} {'TOKENS/MIN':>10} {'CONCURRENT':>10}")
            for t in client.list_tenants():
                q = t.quotas
                print(f"{t.name:32} {'yes' if t.admin else 'no':5} {q.max_deltas:>10} {q.requests_per_minute:>8} "
                      f"{q.tokens_per_minute:>10} {q.max_concurrent:>10}")
        elif args.action == "create":
            tenant, key = client.create_tenant(args.name, admin=args.admin)
            print(f"tenant={tenant.name} api_key={key}")
        elif args.action == "rotate-key":
            # The local key file follows a rotation that revoked the key it holds (an admin rotating their own
            # key, maybe with another admin's): known by asking the server before and after.
            key_file = local_key_file(args)
            held = key_file.read_text().strip() if key_file is not None else ""
            held_worked = bool(held) and key_works(client, held)
            key = client.rotate_key(args.name)
            print(f"tenant={args.name} api_key={key}")
            if held_worked and not key_works(client, held):
                from .admin_key import write_key

                print(f"updated the key file {write_key(key_file.parent, key)}")
        elif args.action == "quotas":
            changes = {f: getattr(args, f) for f in QUOTA_FIELDS if getattr(args, f) is not None}
            if changes:
                tenant = client.set_quotas(args.name, **changes)
            else:
                tenant = next((t for t in client.list_tenants() if t.name == args.name), None)
                if tenant is None:
                    raise CliError(f"tenant {args.name!r} not found")
            print(f"tenant={tenant.name} {_quota_line(tenant)}")
        else:
            client.delete_tenant(args.name)
            print(f"deleted tenant {args.name}")
    return 0


def cmd_recover_admin_key(args) -> int:
    from .admin_key import RecoveryRefused, recover

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    catalogue = args.catalogue or os.environ.get("DELTASERVE_CATALOGUE") or ""
    try:
        path, created = recover(data_dir, args.tenant, catalogue=catalogue)
    except RecoveryRefused as exc:
        raise CliError(str(exc)) from None
    print(f"{'created admin tenant' if created else 'new key for admin tenant'} {args.tenant}; key file {path} "
          f"(the previous key of {args.tenant} no longer works)")
    return 0


def _env_bool(name: str) -> bool | None:
    """A boolean environment setting: unset or empty -> None (the config decides); 1/0, true/false, yes/no, on/off."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in _BOOL_WORDS:
        raise CliError(f"{name}={os.environ[name]!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    return _BOOL_WORDS[raw]


def cmd_serve(args) -> int:
    from .app import serve
    from .config import ServerConfig

    data_dir = args.data_dir or os.environ.get("DELTASERVE_DATA_DIR")  # the same default the client commands use
    env = os.environ.get  # flags win over the environment, both over the config file (secrets live in the env)
    overrides = {"model_path": args.model, "data_dir": data_dir, "listen": args.listen,
                 "metrics_listen": args.metrics_listen, "openai_listen": args.openai_listen,
                 "log_level": args.log_level, "max_model_len": args.max_model_len,
                 "catalogue": args.catalogue or env("DELTASERVE_CATALOGUE") or None,
                 "blobs": args.blobs or env("DELTASERVE_BLOBS") or None,
                 "replica_id": args.replica_id or env("DELTASERVE_REPLICA_ID") or None,
                 "cuda_graphs": (args.cuda_graphs if args.cuda_graphs is not None
                                 else _env_bool("DELTASERVE_CUDA_GRAPHS"))}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = ServerConfig.from_file(args.config, **overrides) if args.config else ServerConfig.from_dict(overrides)
    return serve(config)


# ---- parsing --------------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help (omitted for flags and unset values), descriptions as written."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("deltaserve")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from .config import ServerConfig
    from .models import DEFAULT_MODEL, DEMO_MODEL

    defaults = ServerConfig()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("DELTASERVE_SERVER", DEFAULT_SERVER),
                        help="gRPC HOST:PORT (env DELTASERVE_SERVER)")
    common.add_argument("--api-key", default=os.environ.get("DELTASERVE_API_KEY"),
                        help="tenant API key (env DELTASERVE_API_KEY; default: a local server's admin key)")
    common.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    env_help = "environment variables:\n" + "\n".join(f"  {name:22} {text}" for name, text in ENV_VARS)
    parser = argparse.ArgumentParser(prog="deltaserve", formatter_class=_Help, epilog=env_help,
                                     description="Multi-tenant delta serving: one base model, many tenants' "
                                                 "deltas, gRPC and an OpenAI-compatible HTTP API.")
    parser.add_argument("--version", action="version", version=f"deltaserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help, parents=()):
        return sub.add_parser(name, help=help, description=help, parents=list(parents), formatter_class=_Help)

    p = command("serve", "run the server")
    p.add_argument("--model", default=None, help=f"{DEFAULT_MODEL} (the default: SmolLM2-135M-Instruct, embedded), "
                   f"{DEMO_MODEL} (a random 4-layer model), an HF causal-LM folder, or a .gguf file (converted "
                   "once into the data dir)")
    p.add_argument("--data-dir", help=f"catalogue, blobs, converted models and the admin key (env "
                   f"DELTASERVE_DATA_DIR, default {defaults.data_dir})")
    p.add_argument("--listen", help=f"gRPC HOST:PORT (default {defaults.listen})")
    p.add_argument("--metrics-listen", help=f"Prometheus HOST:PORT (default {defaults.metrics_listen})")
    p.add_argument("--openai-listen", help=f"OpenAI-compatible HTTP HOST:PORT, '' = off (default "
                   f"{defaults.openai_listen})")
    p.add_argument("--max-model-len", type=int, help="prompt + generated tokens per sequence (default: the "
                   "model's limit, capped by the KV cache)")
    p.add_argument("--config", help="TOML or JSON file of ServerConfig fields (flags override it)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help=f"default {defaults.log_level}: start-up lines and one line per request and upload")
    p.add_argument("--catalogue", help="postgresql://USER:PASSWORD@HOST:PORT/DB, shared by replicas "
                   "(env DELTASERVE_CATALOGUE; default SQLite in the data dir)")
    p.add_argument("--blobs", help="s3://BUCKET/PREFIX, shared by replicas; endpoint, region and keys from the "
                   "AWS_* environment or ~/.aws (env DELTASERVE_BLOBS; default files in the data dir)")
    p.add_argument("--replica-id", help="this replica's name in x-deltaserve-replica (env DELTASERVE_REPLICA_ID; "
                   "default the host name)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay pure decode steps from CUDA graphs captured per batch-size bucket; CUDA devices "
                   "only (env DELTASERVE_CUDA_GRAPHS; default off)")
    p.set_defaults(func=cmd_serve)

    p = command("generate", "generate text from a prompt, streamed", [common])
    p.add_argument("prompt")
    sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = command("chat", "chat with the model (its chat template), streamed", [common])
    p.add_argument("message", nargs="?", help="one user message; without it, an interactive session")
    p.add_argument("--system", help="a system message opening the conversation")
    sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = command("upload", "upload a delta (folder, archive or file)", [common])
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--format", default="auto", choices=("auto", "peft", "adapterhub", "opendelta", "bitfit", "native"))
    p.add_argument("--description", default="")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.set_defaults(func=cmd_upload)

    p = command("deltas", "list, show, delete or preload your deltas", [common])
    p.add_argument("action", choices=("list", "show", "delete", "preload"))
    p.add_argument("name", nargs="?", help="NAME (show), NAME or NAME@VERSION (delete, preload)")
    p.add_argument("--host", action="store_true", help="preload: into host memory only, not a device slot")
    p.set_defaults(func=cmd_deltas)

    p = command("tenants", "manage tenants and their quotas (admin key)", [common])
    p.add_argument("action", choices=("create", "list", "delete", "rotate-key", "quotas"))
    p.add_argument("name", nargs="?")
    p.add_argument("--admin", action="store_true", help="create: give the admin role")
    for field in QUOTA_FIELDS:
        p.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, metavar="N",
                       help=f"quotas: set {field} (without any: show them)")
    p.set_defaults(func=cmd_tenants)

    p = command("recover-admin-key", "offline, with the server stopped: issue a new admin key into the data "
                "dir's key file")
    p.add_argument("--data-dir", help=f"the server's data dir (env DELTASERVE_DATA_DIR, default {defaults.data_dir})")
    p.add_argument("--catalogue", help="the catalogue the server uses, when not SQLite in the data dir "
                   "(postgresql://...; env DELTASERVE_CATALOGUE)")
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
