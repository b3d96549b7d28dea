"""The CLI's generation commands, ``deltaserve generate`` and ``deltaserve chat``: their sampling flags, and the
stream of one generation written to the terminal as it comes."""
from __future__ import annotations

import json
import sys

from .cli_client import CliError, client_for
from .terminal import TextOut


def sampling_flags(p) -> None:
    p.add_argument("--delta", help="NAME or NAME@VERSION (default: the base model alone)")
    p.add_argument("--merge", action="append", metavar="NAME=WEIGHT",
                   help="serve a linear merge of your LoRA deltas instead of --delta (repeatable)")
    p.add_argument("--max-new-tokens", type=int, help="default: the model's, else 64 (512 for chat)")
    p.add_argument("--temperature", type=float, help="0 = greedy; default: the model's, else 1.0")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--top-p", type=float, help="default: the model's, else 1.0 (off)")
    p.add_argument("--top-k", type=int, help="default: the model's, else 0 (off)")
    p.add_argument("--seed", type=int, help="sampler seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text ends with TEXT (repeatable)")
    p.add_argument("--stop-token", action="append", type=int, metavar="ID", help="stop after token ID (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling(args) -> dict:
    """SamplingParams fields from the flags; None = unset (the served model's default applies)."""
    if args.greedy and args.temperature not in (None, 0.0):
        raise CliError("--greedy and --temperature contradict each other")
    return {"max_new_tokens": args.max_new_tokens, "temperature": 0.0 if args.greedy else args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "stop_strings": args.stop or None,
            "stop_token_ids": args.stop_token or None, "ignore_eos": args.ignore_eos or None}


def _merge_parts(specs: list[str] | None) -> list[tuple[str, float]]:
    """``--merge NAME=WEIGHT`` (repeatable) -> [(name, weight)]; a one-line error for a malformed one."""
    parts = []
    for spec in specs or ():
        name, sep, weight = spec.rpartition("=")
        try:
            parts.append((name, float(weight)))
        except ValueError:
            name = ""
        if not sep or not name:
            raise CliError(f"--merge {spec!r}: expected NAME=WEIGHT, e.g. --merge style=0.7")
    return parts


def _stream(client, prompt, args, out: TextOut | None):
    """Stream one generation; returns (text, token ids, logprobs, last chunk)."""
    text, ids, logprobs, last = [], [], [], None
    for chunk in client.generate(prompt, delta=args.delta or "", merge=_merge_parts(getattr(args, "merge", None)),
                                 logprobs=getattr(args, "json", False) or None, **_sampling(args)):
        last = chunk
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs)
        if out is not None:
            out.write(chunk.text)
    if last is None:
        raise CliError("the server closed the stream without output")
    return "".join(text), ids, logprobs, last


def cmd_generate(args) -> int:
    from .client import FINISH_NAMES

    out = None if args.json else TextOut()
    with client_for(args) as client:
        text, ids, logprobs, last = _stream(client, args.prompt, args, out)
    if args.json:
        print(json.dumps({"request_id": last.request_id, "text": text, "token_ids": ids,
                          "logprobs": logprobs, "finish_reason": FINISH_NAMES[last.finish_reason],
                          "delta_version": last.delta_version,
                          "usage": {"prompt_tokens": last.usage.prompt_tokens,
                                    "completion_tokens": last.usage.completion_tokens,
                                    "total_tokens": last.usage.total_tokens},
                          "timings": {"queue_seconds": last.timings.queue_seconds,
                                      "ttft_seconds": last.timings.ttft_seconds,
                                      "total_seconds": last.timings.total_seconds}}))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    """One answer to MESSAGE, or an interactive session: each line is a user turn, the whole conversation
    goes with every turn, the answer streams; an empty line or end of input (Ctrl-D) ends it."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    out = TextOut()
    interactive = args.message is None and sys.stdin.isatty()
    with client_for(args) as client:
        if args.message is not None:
            turns = iter([args.message])
        else:
            if interactive:
                print(f"chat with {args.delta or 'the base model'} on {args.server}; an empty line or Ctrl-D ends it",
                      file=sys.stderr)
            turns = _lines(interactive)
        for line in turns:
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            answer, *_ = _stream(client, messages, args, out)
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": answer})
    return 0


def _lines(interactive: bool):
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")
