"""``zhtune generate``: a JSON/JSONL file of prompts or conversations in, a JSONL file of replies out.

Input records: a string, ``{"prompt": ...}``, Alpaca (``instruction``/``input``, ``output`` optional and
kept as the reference), ShareGPT ``conversations`` or OpenAI ``messages`` (a final assistant turn is kept as
the reference and the reply is generated for the turns before it). An ``id`` field names a record; else its
position does.

Requests run through the engine's batching backend with a progress bar. Each finished reply is appended
to the output as one whole line and flushed, so a killed run leaves complete lines only (a torn last line is
dropped on the next run), and a re-run skips every record already answered. When all records are done the
file is rewritten in input order, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError, DataError
from zhtune.infer.engine import EngineArgs
from zhtune.text.records import detect_format, iter_json_records, json_line, to_messages
from zhtune.text.templates import Message

log = logging.getLogger(__name__)
PLACEHOLDER = "\u2026"  # stands in for a missing answer while the record is checked


@dataclass
class GenerateArgs:
    """what to answer and where"""

    input_file: str | None = field(None, "JSON or JSONL of prompts or conversations (required).")
    output_file: str | None = field(None, "JSONL of replies; a re-run continues it (required).")
    system_prompt: str | None = field(None, "System prompt for records that have none.")
    with_prompt: bool = field(True, "Wrap input in the chat template (off: raw text continuation).")
    overwrite: bool = field(False, "Start the output over instead of continuing it.")

    def __post_init__(self) -> None:
        for name in ("input_file", "output_file"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")


SECTIONS = {"model": ModelArgs, "engine": EngineArgs, "job": GenerateArgs, "generation": GenerationArgs}


def to_request(rec: Any) -> tuple[list[Message], str | None]:
    """The conversation to answer and the reference answer, if the record has one."""
    if isinstance(rec, str):
        return [{"role": "user", "content": rec}], None
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}], None
    fmt = detect_format(rec)
    probe, has_answer = dict(rec), True
    if fmt == "alpaca" and not isinstance(rec.get("output"), str):
        probe["output"], has_answer = PLACEHOLDER, False
    for key, role_key, ai in (("conversations", "from", "gpt"), ("messages", "role", "assistant")):
        turns = rec.get(key) if fmt in ("sharegpt", "messages") else None
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            last = str(turns[-1].get(role_key, "")).lower()
            if last in ("human", "user"):
                content_key = "value" if key == "conversations" else "content"
                probe[key], has_answer = [*turns, {role_key: ai, content_key: PLACEHOLDER}], False
    _, msgs = to_messages(probe)
    return msgs[:-1], msgs[-1]["content"] if has_answer else None


def read_requests(path: Path) -> list[tuple[str, list[Message], str | None]]:
    out, seen = [], set()
    for line, rec in iter_json_records(path):
        try:
            msgs, ref = to_request(rec)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        rid = rec.get("id") if isinstance(rec, dict) and "id" in rec else len(out)
        key = str(rid)
        if key in seen:
            raise DataError(path, line, f"duplicate id {rid!r}; ids must be unique")
        seen.add(key)
        out.append((key, msgs, ref))
    if not out:
        raise DataError(path, None, "no records")
    return out


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Records already answered; a torn last line (a killed run) is cut off the file."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        good += len(line)
        done[str(rec["id"])] = rec
    if good < len(raw):
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from zhtune.atomic import atomic_write_text
    from zhtune.infer.engine import Engine

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, e, j, g = cfg.model, cfg.engine, cfg.job, cfg.generation
    src, dst = Path(j.input_file), Path(j.output_file)
    requests = read_requests(src)
    if j.overwrite and dst.exists():
        dst.unlink()
    done = {k: v for k, v in read_done(dst).items() if not v.get("error")}
    todo = [r for r in requests if r[0] not in done]
    print(f"{len(requests)} records, {len(done)} already answered, {len(todo)} to go", flush=True)
    kind = None
    if todo:
        engine = Engine.load(m, e)
        kind = e.backend
        if kind == "auto":
            from zhtune.infer.backends import ContinuousBackend

            why = ContinuousBackend.unsupported(g)
            kind = "generate" if why else "continuous"
            if why:
                log.info("using the generate backend: %s", why)
        engine.start(kind)
        try:
            run(engine, todo, g, j, dst, tqdm(total=len(todo), desc="generate", unit="reply"))
        finally:
            engine.close()
    results = {k: v for k, v in read_done(dst).items()}
    ordered = [results[k] for k, _, _ in requests if k in results]
    if len(ordered) == len(requests):
        atomic_write_text(dst, "".join(json_line(r) + "\n" for r in ordered))
    errors = sum(1 for r in ordered if r.get("error"))
    return {
        "records": len(requests),
        "written": len(ordered),
        "errors": errors,
        "output_file": str(dst),
        "backend": kind,
    }


def run(engine: Any, todo: list, g: GenerationArgs, j: GenerateArgs, dst: Path, bar: Any) -> None:
    """Keep the backend busy with a window of jobs; append each reply as one line when it ends."""
    wake = threading.Event()
    window = engine.args.max_batch_size * 2
    pending = list(reversed(todo))
    running: list[tuple[str, list[Message], str | None, Any]] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "a", encoding="utf-8") as out:
        while pending or running:
            while pending and len(running) < window:
                rid, msgs, ref = pending.pop()
                if j.system_prompt and msgs[0]["role"] != "system":
                    msgs = [{"role": "system", "content": j.system_prompt}, *msgs]
                ids = engine.prompt_ids(msgs, j.with_prompt)
                try:
                    n = engine.max_new_tokens(len(ids), g.max_new_tokens, clamp=True)
                except ConfigError as err:
                    write(out, {"id": rid, "messages": msgs, "output": "", "error": str(err)})
                    bar.update(1)
                    continue
                job = engine.job(ids, g, max_new_tokens=n, chat=j.with_prompt)
                job.listener = wake.set
                engine.submit(job)
                running.append((rid, msgs, ref, job))
            wake.wait(timeout=0.5)
            wake.clear()
            still = []
            for rid, msgs, ref, job in running:
                job.poll()
                if not job.done:
                    still.append((rid, msgs, ref, job))
                    continue
                r = job.reply()
                rec = {
                    "id": rid,
                    "messages": msgs,
                    "output": r.text,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                }
                if ref is not None:
                    rec["reference"] = ref
                if r.error:
                    rec["error"] = r.error
                write(out, rec)
                bar.update(1)
            running = still
    bar.close()


def write(out: Any, rec: dict[str, Any]) -> None:
    """One whole line per write, flushed to disk, so an interruption never leaves half a record."""
    out.write(json_line(rec) + "\n")
    out.flush()
    os.fsync(out.fileno())


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv,
        SECTIONS,
        prog="zhtune generate",
        description="Answer a JSON/JSONL file of prompts or conversations in batches; resumable JSONL output.",
    )
    s = main(cfg)
    print(f"done: {s['written']}/{s['records']} replies ({s['errors']} errors) in {s['output_file']}")
    return 1 if s["errors"] else 0
