"""``zhtune data generate``: instruction data from any OpenAI-compatible endpoint, self-instruct style.

Each request shows the model a few seed tasks and asks for ``--tasks_per_request`` new ones as JSON (mode
``batch``), or asks for one instruction and then sends that instruction for its answer (mode
``two_step``, for models too small to write JSON). Requests run ``--max_concurrency`` at a time through the
official ``openai`` client, each with ``--request_timeout``; 429, 5xx, timeouts and dropped connections are
retried ``--max_retries`` times with exponential backoff and jitter (``Retry-After`` honoured).

New tasks are checked like ``zhtune data filter`` checks records and dropped when near-duplicate (MinHash,
``--similarity_threshold``) of a seed, of the output file or of each other. Kept tasks are appended to
``--out_file`` (JSON Lines, one write and fsync per reply), so a re-run resumes: it reads what is there
(cutting off a torn last line), and asks only for what is missing up to ``--num_samples``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.text.records import json_line

log = logging.getLogger(__name__)
DESCRIPTION = "Generate instruction data through an OpenAI-compatible endpoint (self-instruct, resumable)."


@dataclass
class GenerateArgs:
    """endpoint, prompts and limits"""

    api_base: str = field("http://127.0.0.1:8000/v1", "Base URL of an OpenAI-compatible API (ends in /v1).")
    api_key: str | None = field(None, "API key (default: $OPENAI_API_KEY, else 'EMPTY' for local servers).")
    model: str = field("default", "Model name the endpoint serves.")
    out_file: str | None = field(None, "JSON Lines file the tasks are appended to (a re-run resumes it).")
    num_samples: int = field(100, "How many tasks the output file should hold when done.")
    mode: Literal["batch", "two_step"] = field(
        "batch", "batch: several tasks per reply as JSON; two_step: ask an instruction, then its answer."
    )
    seed_tasks: str | None = field(None, "Seed tasks (any supported format); default: built-in Chinese ones.")
    prompt_template: str | None = field(
        None, "A file replacing the batch prompt ({examples}, {num_tasks}, ...)."
    )
    tasks_per_request: int = field(5, "Tasks asked for in one batch request.")
    examples_per_prompt: int = field(3, "Seed tasks shown in each prompt.")
    max_concurrency: int = field(4, "Requests in flight at once.")
    max_retries: int = field(5, "Retries of a request on 429, 5xx, timeout or connection error.")
    retry_backoff: float = field(1.0, "First retry delay in seconds; doubles each retry, with jitter.")
    request_timeout: float = field(120.0, "Seconds before a request is abandoned (and retried).")
    max_requests: int = field(0, "Give up after this many requests (0: 3x what the missing tasks need + 4).")
    temperature: float = field(1.0, "Sampling temperature.")
    top_p: float = field(1.0, "Nucleus sampling mass.")
    max_tokens: int = field(1536, "Most tokens per reply.")
    similarity_threshold: float = field(
        0.7, "MinHash Jaccard from which a task is a near duplicate (1: off)."
    )
    price_prompt_per_1k: float = field(0.0, "Price per 1,000 prompt tokens, for the cost estimate.")
    price_completion_per_1k: float = field(0.0, "Price per 1,000 completion tokens.")
    seed: int = field(42, "Seed of prompt sampling (with the output's length, so a resume asks anew).")
    report_file: str | None = field(None, "Also write the summary here as JSON.")

    def __post_init__(self) -> None:
        if not self.out_file:
            raise ConfigError("--out_file is required: the JSON Lines file tasks are appended to")
        for name in (
            "num_samples",
            "tasks_per_request",
            "examples_per_prompt",
            "max_concurrency",
            "max_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.request_timeout <= 0 or self.retry_backoff < 0:
            raise ConfigError("--max_retries, --retry_backoff must be >= 0 and --request_timeout > 0")
        if not 0 < self.similarity_threshold <= 1:
            raise ConfigError(f"--similarity_threshold is in (0, 1], got {self.similarity_threshold}")
        if not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(
                f"--api_base must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.api_base!r}"
            )


SECTIONS = {"generate": GenerateArgs}


@dataclass
class GenerateSummary:
    existing: int = 0
    wanted: int = 0
    requests: int = 0
    failed_requests: int = 0
    retries: Counter = dc_field(default_factory=Counter)
    tasks_parsed: int = 0
    kept: int = 0
    dropped: Counter = dc_field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    out_file: str = ""
    errors: Counter = dc_field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()}
        d["total_tokens"] = self.prompt_tokens + self.completion_tokens
        d["tasks_per_s"] = round(self.kept / self.seconds, 3) if self.seconds else 0.0
        d["cost"] = round(self.cost, 6)
        return d

    def table(self) -> str:
        rows = [
            ("already in the file", self.existing),
            ("asked for", self.wanted),
            ("requests", f"{self.requests} ({self.failed_requests} failed after retries)"),
            ("retries", ", ".join(f"{k} {v}" for k, v in self.retries.items()) or "0"),
            ("tasks parsed", self.tasks_parsed),
            ("tasks kept", self.kept),
            ("dropped", sum(self.dropped.values())),
            *[(f"  {k}", v) for k, v in self.dropped.most_common()],
            ("tokens", f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion"),
            ("cost", f"{self.cost:.4f}"),
            ("time", f"{self.seconds:.1f} s, {self.kept / max(self.seconds, 1e-9):.2f} tasks/s"),
        ]
        rows += [(f"  error: {k}", v) for k, v in self.errors.most_common(3)]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def read_existing(path: Path) -> list[dict]:
    """Tasks already in the output; a torn last line (a killed run) is cut off, nothing else is changed."""
    if not path.exists():
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning(
                "%s: cutting off a torn last line (%d bytes) left by an interrupted run",
                path,
                len(data) - cut,
            )
            f.truncate(cut)
            data = data[:cut]
    out = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                from zhtune.errors import DataError

                raise DataError(
                    path, i, f"malformed JSON ({e.msg}); this is not a file generate wrote"
                ) from None
    return out


class Generator:
    def __init__(self, a: GenerateArgs):
        from zhtune.data.dedup import Signer
        from zhtune.data.generate_prompt import Prompts, load_seeds
        from zhtune.data.quality import Quality, QualityArgs
        from zhtune.deps import require

        require("datasketch", "near-duplicate filtering of generated tasks")
        from datasketch import MinHashLSH

        self.a = a
        self.prompts = Prompts(a.prompt_template)
        self.seeds = load_seeds(a.seed_tasks)
        self.quality = Quality(QualityArgs())
        self.quality.setup()
        self.signer = Signer(num_perm=128, ngram=3, seed=1)
        self.lsh = (
            MinHashLSH(threshold=a.similarity_threshold, num_perm=128) if a.similarity_threshold < 1 else None
        )
        self.sigs: list[Any] = []
        self.s = GenerateSummary(out_file=a.out_file or "")

    # ---- near-duplicate index over instruction + input ----
    def _minhash(self, task: dict) -> Any:
        import numpy as np
        from datasketch import MinHash

        from zhtune.data.dedup import normalise

        sig = np.frombuffer(
            self.signer(normalise(task["instruction"] + task.get("input", ""))), dtype=np.uint32
        )
        return MinHash(128, seed=1, hashvalues=sig, scheme=self.signer.scheme)

    def remember(self, task: dict) -> None:
        if self.lsh is not None:
            m = self._minhash(task)
            self.lsh.insert(len(self.sigs), m, check_duplication=False)
            self.sigs.append(m)

    def is_near_duplicate(self, task: dict) -> bool:
        """An LSH candidate counts only when its estimated Jaccard similarity reaches the threshold."""
        if self.lsh is None:
            return False
        m = self._minhash(task)
        return any(m.jaccard(self.sigs[c]) >= self.a.similarity_threshold for c in self.lsh.query(m))

    def judge(self, task: dict) -> str | None:
        """Why a generated task is dropped, or None to keep it."""
        if not task["instruction"].strip():
            return "no instruction"
        msgs = [
            {"role": "user", "content": task["instruction"] + ("\n" + task["input"] if task["input"] else "")}
        ]
        msgs.append({"role": "assistant", "content": task["output"]})
        failed = self.quality.checks(msgs)
        if failed:
            return failed[0]
        if self.is_near_duplicate(task):
            return "near duplicate"
        return None

    # ---- requests ----
    async def chat(self, client: Any, prompt: str) -> str:
        import openai

        a = self.a
        for attempt in range(a.max_retries + 1):
            try:
                resp = await client.chat.completions.create(
                    model=a.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=a.temperature,
                    top_p=a.top_p,
                    max_tokens=a.max_tokens,
                )
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                kind = type(e).__name__
                status = getattr(e, "status_code", None)
                kind = (
                    f"{status}" if status else ("timeout" if isinstance(e, openai.APITimeoutError) else kind)
                )
                if attempt == a.max_retries:
                    self.s.errors[f"{kind}: {str(e)[:80]}"] += 1
                    raise
                self.s.retries[kind] += 1
                await asyncio.sleep(self._delay(e, attempt))
                continue
            except openai.APIStatusError as e:  # 4xx other than 429: every request would fail the same way
                raise ConfigError(
                    f"the endpoint {a.api_base} answered {e.status_code}: {str(e)[:300]} "
                    "(check --api_base, --api_key and --model)"
                ) from None
            usage = getattr(resp, "usage", None)
            if usage is not None:
                self.s.prompt_tokens += usage.prompt_tokens or 0
                self.s.completion_tokens += usage.completion_tokens or 0
            if not resp.choices:
                return ""
            return resp.choices[0].message.content or ""
        raise AssertionError("unreachable")

    def _delay(self, e: Exception, attempt: int) -> float:
        resp = getattr(e, "response", None)
        after = resp.headers.get("retry-after") if resp is not None else None
        try:
            if after is not None:
                return min(float(after), 60.0)
        except ValueError:
            pass
        return self.a.retry_backoff * (2**attempt) * (0.5 + random.random())

    async def one_request(self, client: Any, index: int) -> list[dict]:
        a = self.a
        rng = random.Random(a.seed * 1_000_003 + self.s.existing * 7919 + index)
        examples = rng.sample(self.seeds, min(a.examples_per_prompt, len(self.seeds)))
        from zhtune.data.generate_prompt import first_line, parse_tasks

        if a.mode == "batch":
            reply = await self.chat(client, self.prompts.render("batch", rng, examples, a.tasks_per_request))
            return parse_tasks(reply)
        instruction = first_line(
            await self.chat(client, self.prompts.render("instruction_only", rng, examples, 1))
        )
        if not instruction:
            return [{"instruction": "", "input": "", "output": ""}]
        answer = await self.chat(client, instruction)
        return [{"instruction": instruction, "input": "", "output": answer.strip()}]

    async def run(self, out: Path, need: int) -> None:
        import openai

        a = self.a
        key = a.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        client = openai.AsyncOpenAI(
            base_url=a.api_base, api_key=key, timeout=a.request_timeout, max_retries=0
        )
        per = a.tasks_per_request if a.mode == "batch" else 1
        max_requests = a.max_requests or 3 * -(-need // per) + 4
        pending: set[asyncio.Task] = set()
        launched = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=need, unit="task", desc="generate", disable=None)
        try:
            with open(out, "a", encoding="utf-8") as f:
                while self.s.kept < need:
                    while (
                        len(pending) < a.max_concurrency
                        and launched < max_requests
                        and self.s.kept + len(pending) * per < need
                    ):
                        pending.add(asyncio.create_task(self.one_request(client, launched)))
                        launched += 1
                    if not pending:
                        break
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        self.s.requests += 1
                        try:
                            tasks = t.result()
                        except ConfigError:
                            raise
                        except Exception as e:  # noqa: BLE001 - a request that failed after its retries
                            self.s.failed_requests += 1
                            log.debug("request failed: %s", e)
                            continue
                        lines = self.accept(tasks, need)
                        if lines:
                            f.write("".join(lines))
                            f.flush()
                            os.fsync(f.fileno())
                            bar.update(len(lines))
        finally:
            for t in pending:
                t.cancel()
            bar.close()
            await client.close()

    def accept(self, tasks: list[dict], need: int) -> list[str]:
        lines = []
        for task in tasks:
            self.s.tasks_parsed += 1
            if self.s.kept >= need:
                self.s.dropped["not needed (enough tasks)"] += 1
                continue
            why = self.judge(task)
            if why:
                self.s.dropped[why] += 1
                continue
            self.remember(task)
            self.s.kept += 1
            lines.append(json_line(task) + "\n")
        return lines


def main(cfg: Config | dict[str, Any]) -> GenerateSummary:
    from zhtune.deps import require

    require("openai", "talking to an OpenAI-compatible endpoint")
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)
    a: GenerateArgs = cfg.generate
    out = Path(a.out_file)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = read_existing(out)
    gen = Generator(a)
    for seed in gen.seeds:
        gen.remember(seed)
    for rec in existing:
        if isinstance(rec, dict) and isinstance(rec.get("instruction"), str):
            gen.remember({"instruction": rec["instruction"], "input": str(rec.get("input") or "")})
    gen.s.existing = len(existing)
    need = max(0, a.num_samples - len(existing))
    gen.s.wanted = need
    t0 = time.perf_counter()
    if need:
        asyncio.run(gen.run(out, need))
    gen.s.seconds = time.perf_counter() - t0
    gen.s.cost = (
        gen.s.prompt_tokens / 1000 * a.price_prompt_per_1k
        + gen.s.completion_tokens / 1000 * a.price_completion_per_1k
    )
    return gen.s


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune data generate", description=DESCRIPTION)
    s = main(cfg)
    if not s.wanted:
        print(
            f"{s.out_file} already holds {s.existing} tasks (--num_samples {cfg.generate.num_samples}): nothing to do"
        )
    print(
        f"zhtune data generate:\n{s.table()}\noutput: {s.out_file} ({s.existing + s.kept} tasks)", flush=True
    )
    if cfg.generate.report_file:
        from zhtune.atomic import atomic_write_text

        atomic_write_text(
            cfg.generate.report_file, json.dumps(s.to_dict(), ensure_ascii=False, indent=2) + "\n"
        )
    if s.wanted and s.kept < s.wanted:
        print(
            f"zhtune data generate: only {s.kept} of the {s.wanted} missing tasks were made; run again to resume",
            flush=True,
        )
        return 1
    return 0
