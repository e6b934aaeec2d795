"""``zhtune chat``: talk to a model (plus LoRA adapters) in the terminal, or answer one prompt for scripts.

Interactive commands: ``clear`` resets the history, ``history`` shows it, ``system <text>`` sets the system
prompt (and starts over), ``stream`` toggles streaming, ``exit`` quits. End a line with ``\\`` to continue it
on the next line, or wrap a block in lines of ``\"\"\"``. Ctrl-C stops the current reply, not the program;
at the prompt it clears the line, and Ctrl-D (or ``exit``) quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.infer.engine import EngineArgs
from zhtune.infer.terminal import CtrlC, Terminal

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


def read_user(read: Callable[[str], str] = input, prompt: str = "用户> ") -> str | None:
    """Read one user message with ``read`` (``input`` or a :class:`Terminal`); supports '\\' continuation and
    \"\"\" blocks. None at end of input."""
    try:
        line = read(prompt)
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                nxt = read("")
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
            line = read("... ")
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def respond(
    engine: Any,
    messages: list[dict[str, str]],
    g: GenerationArgs,
    with_prompt: bool,
    stream: bool,
    ctrl_c: CtrlC,
) -> str:
    """Generate one reply, printing it and then how it ended; call inside ``ctrl_c.reply()``, where Ctrl-C
    ends the reply early (marked ``[stopped]``) and keeps what was said."""
    job, pieces = engine.stream(messages, g, with_template=with_prompt)
    ctrl_c.watch(job)
    for piece in pieces:
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
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


class Session:
    """An interactive conversation: its history, system prompt and streaming switch."""

    def __init__(self, engine: Any, c: ChatArgs, g: GenerationArgs, read: Callable[[str], str]):
        self.engine, self.c, self.g, self.read = engine, c, g, read
        self.history: list[dict[str, str]] = []
        self.system = c.system_prompt
        self.stream = c.stream

    def turn(self, ctrl_c: CtrlC) -> bool:
        """Read one input and act on it; False when the session ends."""
        text = read_user(self.read)
        if text is None:
            print()
            return False
        cmd = text.strip()
        if cmd in ("exit", "quit"):
            return False
        if cmd and not self.command(cmd):
            with ctrl_c.reply():
                sys.stdout.write("助手> ")
                sys.stdout.flush()
                msgs = [{"role": "system", "content": self.system}] if self.system else []
                msgs += [*self.history, {"role": "user", "content": text}]
                reply = respond(self.engine, msgs, self.g, self.c.with_prompt, self.stream, ctrl_c)
                self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return True

    def command(self, cmd: str) -> bool:
        """Run ``cmd`` if it is a session command; False if it is a message for the model."""
        if cmd == "clear":
            self.history = []
            print("(history cleared)", flush=True)
        elif cmd == "stream":
            self.stream = not self.stream
            print(f"(streaming {'on' if self.stream else 'off'})", flush=True)
        elif cmd == "history":
            if self.system:
                print(f"system: {self.system}")
            for h in self.history:
                print(f"{h['role']}: {h['content']}")
            print(f"({len(self.history) // 2} turns)", flush=True)
        elif cmd == "system" or cmd.startswith("system "):
            self.system = cmd[len("system") :].strip() or None
            self.history = []
            print(f"(system prompt {'set' if self.system else 'removed'}; history cleared)", flush=True)
        else:
            return False
        return True


def interactive(engine: Any, c: ChatArgs, g: GenerationArgs) -> int:
    print(HELP, flush=True)
    terminal = Terminal.open()
    session = Session(engine, c, g, terminal or input)
    try:
        with CtrlC().installed() as ctrl_c:
            while True:
                try:
                    if not session.turn(ctrl_c):
                        return 0
                except KeyboardInterrupt:  # at the prompt, or between turns: a fresh line
                    print(flush=True)
    finally:
        if terminal is not None:
            terminal.close()


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
        with CtrlC().installed() as ctrl_c, ctrl_c.reply():
            respond(engine, msgs, g, c.with_prompt, c.stream, ctrl_c)
        return 0
    finally:
        engine.close()


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv, SECTIONS, prog="zhtune chat", description="Chat with a model and optional LoRA adapters."
    )
    return main(cfg)
