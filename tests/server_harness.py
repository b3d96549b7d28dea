"""A real deltaserve server for tests: started on 127.0.0.1:0 on a background thread (engine loop on its
own event loop), with a tiny demo-shaped Llama and a tmp data dir, driven through ``server.client``; plus
the helpers the server tests share (auth metadata, PEFT LoRA uploads, the greedy parity oracle)."""
from __future__ import annotations

import asyncio
import io
import logging
import shlex
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from server.app import build_app, run
from server.client import Client, bearer, generate_request, upload_messages
from server.config import ServerConfig
from server.demo import build_demo_model
from server.logs import KeyValueFormatter
from server.pb import deltas_pb2, inference_pb2

MAX_UPLOAD = 256 << 10  # the test LoRAs are ~20 KB as tar.gz
PROMPT = [3 + b for b in b"hello world"]  # byte-level tokenizer: byte b -> id 3 + b
DELTA_BUDGET = 96 << 10  # device memory for deltas: ~7 of peft_lora()s (13.7 KB each), not one rank-16 LoRA on all
# seven projections (132 KB), so uploads beyond the budget and evictions are exercised end to end


class Served:
    """A started server on a background thread: address, metrics URL, admin key, the in-process app."""

    def __init__(self, root, model_dir=None, **overrides):
        """``model_dir``: the model to serve (default: a tiny 2-layer demo-shaped Llama built under ``root``);
        ``overrides``: ServerConfig fields replacing the test defaults below."""
        if model_dir is None:
            model_dir = build_demo_model(root / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        values = dict(model_path=str(model_dir), data_dir=str(root / "data"), listen="127.0.0.1:0",
                      metrics_listen="127.0.0.1:0", openai_listen="127.0.0.1:0", delta_memory_bytes=DELTA_BUDGET,
                      max_rank=16, max_batch_tokens=256, max_running=8, max_model_len=512,
                      max_upload_bytes=MAX_UPLOAD, grace_seconds=1.0, health_grace_seconds=0.0)
        config = ServerConfig(**{**values, **overrides})
        self.model_dir = model_dir
        self.app = build_app(config)
        self.app.ensure_admin()
        self.admin_key = self.app.admin_key_file.read_text().strip()
        self.lines: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while len(self.lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.lines) >= 3, f"server did not start: {self.lines}"
        self.address = self.lines[0].split()[-1]
        self.metrics_url = self.lines[1].split()[-1]
        self.openai_url = self.lines[2].removeprefix("openai: ")  # http://127.0.0.1:PORT/v1
        self.client = Client(self.address, self.admin_key)
        # the raw stubs, for tests that send exact messages with their own metadata
        self.inference, self.deltas, self.tenants = self.client.inference, self.client.deltas, self.client.tenants

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop = asyncio.Event()
            await run(self.app, self.stop, announce=self.lines.append)

        self.loop.run_until_complete(main())

    def close(self) -> None:
        self.client.close()
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=30)

    def tenant(self, name: str, **quotas) -> list[tuple[str, str]]:
        _tenant, key = self.client.create_tenant(name, quotas=quotas)
        return auth(key)

    def requests_counted(self, tenant: str, status: str) -> float:
        """deltaserve_requests_total{tenant, status} as the server's registry holds it now."""
        value = self.app.metrics.registry.get_sample_value("deltaserve_requests_total",
                                                           {"tenant": tenant, "status": status})
        return value or 0.0

    def idle(self, timeout: float = 10.0) -> None:
        """Wait until no request holds KV blocks or pins a delta (the engine finished or aborted everything)."""
        engine, residency = self.app.engine, self.app.residency
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (engine.runner.kv.allocator.num_used == 0 and residency.stats().pinned == 0
                    and not engine.scheduler.has_work()):
                return
            time.sleep(0.01)
        raise AssertionError(f"still busy: kv blocks {engine.runner.kv.allocator.num_used}, "
                             f"pinned deltas {residency.stats().pinned}")


def fixture_model(arch: str, dest) -> Path:
    """A reference-fixture base (tests/fixtures/base/<arch>) as a servable folder: its files plus the demo's
    byte-level tokenizer (the tests send token ids; the server wants a tokenizer next to the weights)."""
    import shutil

    from server.engine.tokenizer import byte_level_tokenizer
    from tests.helpers import FIXTURES

    dest = Path(dest)
    shutil.copytree(FIXTURES / "base" / arch, dest)
    byte_level_tokenizer().save_pretrained(dest)
    return dest


def tar_gz(folder) -> bytes:
    """A delta folder as the tar.gz bytes a tenant uploads."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(Path(folder).iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


def auth(key: str) -> list[tuple[str, str]]:
    return list(bearer(key))


def peft_lora(model_dir, seed: int) -> tuple[bytes, torch.nn.Module]:
    """A PEFT LoRA (random A and B) for the served base, as tar.gz bytes, and the merged HF model (the oracle)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # PEFT's random init keeps B small; scale it so the delta changes greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(Path(tmp).iterdir()):
                tar.add(f, arcname=f.name)
    return buf.getvalue(), peft_model.merge_and_unload().eval()


def peft_lora_footprint(model_dir) -> int:
    """Device bytes one ``peft_lora`` delta takes on the server serving ``model_dir`` (its cells and its slot in the
    per-slot tables): what a delta budget of "k resident deltas" is k times."""
    from transformers import AutoModelForCausalLM

    from delta_store.delta import Delta, LoraTerm, ModuleDelta
    from server.deltas import DeltaLinear, wrap_model

    dm = wrap_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    modules = {path: ModuleDelta(lora=LoraTerm(torch.zeros(4, layer.in_features), torch.zeros(layer.out_features, 4),
                                               2.0))
               for path, layer in dm.layers.items()
               if isinstance(layer, DeltaLinear) and path.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj")}
    return dm.footprint(Delta(modules)) + dm.slot_bytes


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """The parity oracle: HF forward on the merged model, argmax token by token, no EOS stop."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def upload(srv, md, name: str, data: bytes, *, total: int | None = None, chunk: int = 8 << 10,
           timeout: float | None = None):
    """UploadDelta of ``data`` in ``chunk``-byte messages; ``total`` is the header's claim (None: unset)."""
    messages = upload_messages(name, io.BytesIO(data), total_bytes=total, description="test", chunk_bytes=chunk)
    return srv.deltas.UploadDelta(messages, metadata=md, timeout=timeout).version


def gen_request(delta: str = "", n: int = 8, **sampling) -> inference_pb2.GenerateRequest:
    return generate_request(PROMPT, delta=delta, max_new_tokens=n, temperature=0.0, ignore_eos=True, **sampling)


def collect(stream) -> tuple[list[int], list]:
    chunks = list(stream)
    return [t for c in chunks for t in c.token_ids], chunks


def code_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


class LogLines(logging.Handler):
    """Every ``deltaserve.*`` log line at info and above, formatted as the server writes them (key=value)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(KeyValueFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> "LogLines":
        root = logging.getLogger("deltaserve")
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger("deltaserve")
        root.removeHandler(self)
        root.setLevel(self._level)

    def events(self, event: str) -> list[dict[str, str]]:
        """The fields of each line of ``event`` (values unquoted as the formatter quoted them)."""
        out = []
        for line in list(self.lines):
            fields = dict(part.split("=", 1) for part in shlex.split(line))
            if fields.get("event") == event:
                out.append(fields)
        return out


def held_upload(srv, md, name: str, *, chunks: list[bytes] = (), labels=None, timeout: float = 30.0):
    """An UploadDelta that sends its header (and ``chunks``) and then holds the stream open until
    ``release()``: returns (future, release). A server that refuses early answers while it is held."""
    gate = threading.Event()

    def messages():
        header = deltas_pb2.UploadHeader(name=name, labels=labels or {})
        yield deltas_pb2.UploadDeltaRequest(header=header)
        for c in chunks:
            yield deltas_pb2.UploadDeltaRequest(chunk=c)
        gate.wait(timeout)

    return srv.deltas.UploadDelta.future(messages(), metadata=md, timeout=timeout), gate.set


def finished_within(future, seconds: float) -> bool:
    try:
        future.exception(timeout=seconds)
    except grpc.FutureTimeoutError:
        return False
    return True


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_model_dir(root: Path) -> Path:
    """The tiny demo-shaped model, with a chat template on its tokenizer (turns end with <eos>)."""
    from transformers import AutoTokenizer

    model_dir = build_demo_model(root / "chat-model", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    return model_dir


def openai_client(srv: Served, key: str):
    """The official ``openai`` client against the server's HTTP front (no retries: tests see every status)."""
    import openai

    return openai.OpenAI(base_url=srv.openai_url, api_key=key, max_retries=0, timeout=60)
