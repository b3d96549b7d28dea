"""Reading what deploy/ ships, offline: the kustomize base rendered the way ``kubectl kustomize`` renders
the features it uses (resources, configMapGenerator files, metadata labels; no hash suffixes), and the
nginx configuration checked by the real ``nginx -t`` inside a throwaway main config."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUSTOMIZE_BASE = DEPLOY / "kubernetes"
NGINX_CONF = DEPLOY / "nginx" / "deltaserve.conf"
_KNOWN_FIELDS = {"apiVersion", "kind", "labels", "resources", "configMapGenerator"}


def render_kustomization(root: Path = KUSTOMIZE_BASE) -> list[dict]:
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - _KNOWN_FIELDS
    if unknown:
        raise ValueError(f"kustomization uses {sorted(unknown)}: teach render_kustomization first")
    docs: list[dict] = []
    for name in kust.get("resources", []):
        docs += [d for d in yaml.safe_load_all((root / name).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (root / f).read_text() for f in gen.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for entry in kust.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    return docs


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def nginx_main_conf(root: Path, include: Path, *, access_log: bool = False) -> Path:
    """A main nginx.conf that runs as the current user with everything under ``root``."""
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d).chmod(0o777)  # as root, nginx's workers run as nobody and buffer request bodies here
    log = f"access_log {root}/access.log;" if access_log else "access_log off;"
    conf = root / "nginx.conf"
    conf.write_text(f"""daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    {log}
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {include};
}}
""")
    return conf


def nginx_test(conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([nginx_binary(), "-t", "-q", "-c", str(conf), "-p", str(conf.parent)],
                          capture_output=True, text=True, timeout=30)
