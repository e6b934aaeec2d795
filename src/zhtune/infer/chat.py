"""``zhtune chat``: talk to a model (plus LoRA adapters) in the terminal, or answer one prompt for scripts.

Interactive commands: ``clear`` resets the history, ``history`` shows it, ``system <text>`` sets the system
prompt (and starts over), ``stream`` toggles streaming, ``exit`` quits. End a line with ``\\`` to continue it
on the next line, or wrap a block in lines of ``\"\"\"``. Ctrl-C stops the current reply, not the program;
at the prompt it clears the line, and Ctrl-D (or ``exit``) quits.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Any

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.infer.engine import EngineArgs

HELP = (
    "zhtune chat: 'clear' resets, 'history', 'system <text>', 'stream' toggles, 'exit' quits; "
    'end a line with \\ or wrap lines in """ for multi-line input; Ctrl-C stops a reply'
)


@dataclass
class ChatArgs:
    """how to chat"""

    system_prompt: str | None = field(None, "System prompt.")
    interactive: bool = field(False, "Multi-turn conversation at a prompt.")
    prompt: str | None = field(
        None, "Answer this one prompt and exit (stdin is read when neither this nor --interactive is given)."
    )
    with_prompt: bool = field(True, "Wrap input in the chat template (off: raw text continuation).")
    stream: bool = field(True, "Print tokens as they are generated.")


SECTIONS = {"model": ModelArgs, "engine": EngineArgs, "chat": ChatArgs, "generation": GenerationArgs}


def read_user(prompt: str = "用户> ") -> str | None:
    """Read one user message; supports '\\' continuation and \"\"\" blocks. None at end of input."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                nxt = input()
            except EOFError:
                break
            if nxt.strip() == '"""':
                break
            lines.append(nxt)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = input("... ")
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def respond(
    engine: Any, messages: list[dict[str, str]], g: GenerationArgs, with_prompt: bool, stream: bool
) -> str:
    """Generate one reply, printing it; Ctrl-C ends the reply early and keeps what was said."""
    job, pieces = engine.stream(messages, g, with_template=with_prompt)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: job.request_cancel())
    try:
        for piece in pieces:
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    text = job.text()
    if not stream:
        sys.stdout.write(text)
    if job.finish_reason == "cancelled":
        sys.stdout.write(" [stopped]")
    elif job.finish_reason == "length":
        sys.stdout.write(" [cut at --max_new_tokens]")
    elif job.finish_reason == "error":
        sys.stdout.write(f" [error: {job.error}]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def interactive(engine: Any, c: ChatArgs, g: GenerationArgs) -> int:
    print(HELP, flush=True)
    history: list[dict[str, str]] = []
    system = c.system_prompt
    stream = c.stream
    while True:
        try:
            text = read_user()
        except KeyboardInterrupt:
            print(flush=True)
            continue
        if text is None:
            print()
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("exit", "quit"):
            return 0
        if cmd == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if cmd == "stream":
            stream = not stream
            print(f"(streaming {'on' if stream else 'off'})", flush=True)
            continue
        if cmd == "history":
            if system:
                print(f"system: {system}")
            for h in history:
                print(f"{h['role']}: {h['content']}")
            print(f"({len(history) // 2} turns)", flush=True)
            continue
        if cmd == "system" or cmd.startswith("system "):
            system = cmd[len("system") :].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)", flush=True)
            continue
        msgs = (
            ([{"role": "system", "content": system}] if system else [])
            + history
            + [{"role": "user", "content": text}]
        )
        sys.stdout.write("助手> ")
        sys.stdout.flush()
        reply = respond(engine, msgs, g, c.with_prompt, stream)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def main(cfg: Config | dict[str, Any]) -> int:
    from zhtune.infer.engine import Engine

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, e, c, g = cfg.model, cfg.engine, cfg.chat, cfg.generation
    text = None
    if not c.interactive:
        text = c.prompt if c.prompt is not None else sys.stdin.read()
        if not text.strip():
            raise ConfigError("no prompt: pass --prompt, pipe text on stdin, or use --interactive")
    engine = Engine.load(m, e)
    engine.start("generate" if e.backend == "auto" else e.backend)
    try:
        if c.interactive:
            return interactive(engine, c, g)
        msgs = ([{"role": "system", "content": c.system_prompt}] if c.system_prompt else []) + [
            {"role": "user", "content": text.strip()}
        ]
        respond(engine, msgs, g, c.with_prompt, c.stream)
        return 0
    finally:
        engine.close()


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv, SECTIONS, prog="zhtune chat", description="Chat with a model and optional LoRA adapters."
    )
    return main(cfg)
