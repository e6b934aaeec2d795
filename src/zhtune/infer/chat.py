"""``zhtune chat``: talk to a model (plus LoRA adapters) in the terminal, or answer one prompt for scripts.

Interactive commands: ``clear`` resets the history, ``history`` shows it, ``system <text>`` sets the system
prompt, ``stream`` toggles streaming, ``exit`` quits. End a line with ``\\`` to continue it on the next
line, or wrap a block in lines of ``\"\"\"``. Ctrl-C stops the current reply, not the program.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Any

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.config.parse import ConfigError, field, parse_cli


@dataclass
class ChatArgs:
    """what to chat with"""

    lora_models: list[str] | None = field(
        None, "LoRA adapters applied in order, comma separated. Alias: --lora_model."
    )
    template: str | None = field(None, "Chat template (default: the one saved with the model or adapter).")
    system_prompt: str | None = field(None, "System prompt.")
    interactive: bool = field(False, "Multi-turn conversation at a prompt.")
    prompt: str | None = field(
        None, "Answer this one prompt and exit (stdin is read when neither this nor --interactive is given)."
    )
    with_prompt: bool = field(True, "Wrap input in the chat template (off: raw text continuation).")
    stream: bool = field(True, "Print tokens as they are generated.")


SECTIONS = {"model": ModelArgs, "chat": ChatArgs, "generation": GenerationArgs}


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


def respond(engine: Any, messages: list[dict[str, str]], g: GenerationArgs, c: ChatArgs, stream: bool) -> str:
    from zhtune.infer.engine import StopFlag

    stop = StopFlag()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        stop.event.set()

    signal.signal(signal.SIGINT, on_interrupt)
    text = ""
    try:
        for piece in engine.stream(messages, g, stop=stop, with_template=c.with_prompt):
            text += piece
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    if not stream:
        sys.stdout.write(text.strip())
    if stop.event.is_set() and stream:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text.strip()


def main(cfg: Any) -> int:
    from zhtune.infer.engine import Engine

    m, c, g = cfg.model, cfg.chat, cfg.generation
    engine = Engine.load(m, c.lora_models or [], c.template)
    system = c.system_prompt
    if not c.interactive:
        text = c.prompt if c.prompt is not None else sys.stdin.read()
        if not text.strip():
            raise ConfigError("no prompt: pass --prompt, pipe text on stdin, or use --interactive")
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text.strip()}
        ]
        respond(engine, msgs, g, c, c.stream)
        return 0

    print(
        "zhtune chat: 'clear' resets, 'history', 'system <text>', 'stream' toggles, 'exit' quits; Ctrl-C stops a reply"
    )
    history: list[dict[str, str]] = []
    stream = c.stream
    while True:
        try:
            text = read_user()
        except KeyboardInterrupt:
            print()
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
            print("(history cleared)")
            continue
        if cmd == "stream":
            stream = not stream
            print(f"(streaming {'on' if stream else 'off'})")
            continue
        if cmd == "history":
            for h in history:
                print(f"{h['role']}: {h['content']}")
            continue
        if cmd.startswith("system "):
            system = cmd[len("system ") :].strip()
            print("(system prompt set)")
            continue
        msgs = (
            ([{"role": "system", "content": system}] if system else [])
            + history
            + [{"role": "user", "content": text}]
        )
        sys.stdout.write("助手> ")
        sys.stdout.flush()
        reply = respond(engine, msgs, g, c, stream)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv, SECTIONS, prog="zhtune chat", description="Chat with a model and optional LoRA adapters."
    )
    return main(cfg)
