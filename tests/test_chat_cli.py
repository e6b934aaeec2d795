"""``zhtune chat`` driven as a person would: through a pseudo-terminal, Ctrl-C included."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from infer_models import never_stopping_model

pexpect = pytest.importorskip("pexpect")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory, bpe_tokenizer_dir):
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("looping_chat"))


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory, bpe_tokenizer_dir):
    """Never stops and has a context of a million tokens: a reply without --max_new_tokens runs for hours, so
    a Ctrl-C sent once it has begun always finds it running, however slow the machine."""
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("endless_chat"), context=1 << 20)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e["HF_HUB_OFFLINE"] = "1"
    return e


def chat_cmd(model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zhtune",
        "chat",
        "--model_name_or_path",
        str(model),
        "--temperature",
        "0",
        *extra,
    ]


def spawn(cmd: list[str]) -> pexpect.spawn:
    # every expect waits for a state the program prints; the timeout only bounds a hang on a loaded machine
    return pexpect.spawn(cmd[0], cmd[1:], env=env(), encoding="utf-8", timeout=180, dimensions=(40, 200))


def test_ctrl_c_stops_a_reply_and_clears_the_prompt(endless_model):
    child = spawn(chat_cmd(endless_model, "--interactive"))
    try:
        child.expect("Ctrl-C stops a reply")
        child.expect("用户> ")

        # a reply that cannot end by itself, stopped by Ctrl-C once it has begun: the program stays and keeps
        # what was said
        child.sendline("你好")
        child.expect("助手> ")
        child.expect("[好的]")
        child.sendintr()
        child.expect(r"\[stopped\]\r\n用户> ")

        child.sendline("history")
        child.expect(r"user: 你好\r\n")
        child.expect(r"assistant: ([好的]+)\r\n")
        assert len(child.match.group(1)) > 0
        child.expect(r"\(1 turns\)\r\n用户> ")

        # Ctrl-C at the prompt, at once and again: each clears the line and prompts again, it does not quit
        for _ in range(3):
            child.sendintr()
            child.expect("用户> ")
        child.sendline("history")
        child.expect(r"\(1 turns\)\r\n用户> ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_interactive_commands_and_multi_line_input(looping_model):
    child = spawn(chat_cmd(looping_model, "--interactive", "--max_new_tokens", "20"))
    try:
        child.expect("用户> ")
        # streaming off, multi-line input with a trailing backslash, a reply cut at max_new_tokens
        child.sendline("stream")
        child.expect(r"\(streaming off\)")
        child.sendline("第一行\\")
        child.expect(r"\.\.\. ")
        child.sendline("第二行")
        child.expect(r"助手> ([好的]+) \[cut at --max_new_tokens\]")
        assert len(child.match.group(1)) == 20
        child.sendline("history")
        child.expect("user: 第一行\r\n第二行")
        child.expect(r"\(1 turns\)")

        # a block in triple quotes
        child.sendline('"""')
        child.sendline("甲")
        child.sendline("乙")
        child.sendline('"""')
        child.expect(r"\[cut at --max_new_tokens\]")
        child.sendline("history")
        child.expect("user: 甲\r\n乙\r\n")
        child.expect(r"\(2 turns\)")

        child.sendline("system 你是一个乐于助人的助手。")
        child.expect(r"\(system prompt set; history cleared\)")
        child.sendline("history")
        child.expect("system: 你是一个乐于助人的助手。")
        child.expect(r"\(0 turns\)")
        child.sendline("clear")
        child.expect(r"\(history cleared\)")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# A SIGINT sent the moment each prompt is written (from a thread, as CPython issue 112585 reproduces it): with
# input() one soon lands between the prompt and the read and is held until Enter; the terminal reader sees all.
PROMPT_RACE = """
import os, signal, sys, threading
from zhtune.infer.terminal import CtrlC, Terminal

asked, done = threading.Event(), threading.Event()

def interrupter():
    while not done.is_set():
        if asked.wait(0.1):
            asked.clear()
            os.kill(os.getpid(), signal.SIGINT)

class Read(Terminal):
    def __call__(self, prompt=""):
        asked.set()
        return super().__call__(prompt)

threading.Thread(target=interrupter, daemon=True).start()
read = Terminal.open()
assert read is not None, "stdin is not a terminal"
read = Read(read.fd, "utf-8")
n = 0
with CtrlC().installed():
    while n < int(sys.argv[1]):
        try:
            read(">")
        except KeyboardInterrupt:
            n += 1
done.set()
print("ALL", n, "INTERRUPTED", flush=True)
"""


def test_ctrl_c_at_the_moment_the_prompt_appears_is_never_lost():
    n = 500
    child = pexpect.spawn(
        sys.executable, ["-c", PROMPT_RACE, str(n)], env=env(), encoding="utf-8", timeout=120
    )
    try:
        child.expect(f"ALL {n} INTERRUPTED")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_single_prompt_from_argument_and_stdin(looping_model, monkeypatch, capsys):
    """The script mode, in-process (the pseudo-terminal test above covers the real process)."""
    import io

    from zhtune.cli import main

    base = chat_cmd(looping_model)[3:]  # the options after "python -m zhtune"
    assert main([*base, "--prompt", "你好", "--max_new_tokens", "6"]) == 0
    reply, _, tail = capsys.readouterr().out.strip().partition(" [cut")
    assert len(reply) == 6 and set(reply) <= set("好的") and tail == " at --max_new_tokens]"
    monkeypatch.setattr(sys, "stdin", io.StringIO("北京\n"))
    assert main([*base, "--max_new_tokens", "4", "--with_prompt", "false", "--stream", "false"]) == 0
    reply = capsys.readouterr().out.split(" [cut")[0].strip()
    assert len(reply) == 4 and set(reply) <= set("好的")


def test_no_prompt_is_an_error(monkeypatch, capsys, tmp_path):
    import io

    from zhtune.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert main(["chat", "--model_name_or_path", str(tmp_path / "never-loaded")]) == 2
    assert "no prompt: pass --prompt, pipe text on stdin, or use --interactive" in capsys.readouterr().err


def test_quantized_loading_needs_a_gpu(capsys, looping_model):
    import torch

    from zhtune.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["chat", "--prompt", "你好", "--model_name_or_path", str(looping_model), "--load_in_4bit"]
    assert main(argv) == 2
    assert "--load_in_4bit needs a CUDA GPU" in capsys.readouterr().err
