"""Encode preference data into the token columns TRL's trainers take, through ``datasets``, cached by content.

The prompt is the conversation up to the reply, rendered by the chat template with its generation prompt; a
reply is the template's supervised segment for that assistant turn (its text and end-of-turn token). Both
come from the SFT segment encoder, so no token straddles the boundary, and prompt + reply are exactly the
ids SFT trains on for that conversation, up to and including the end-of-turn token.

Layouts (columns), as each TRL trainer takes them once its own tokenization is bypassed:
* ``dpo`` (DPOTrainer; losses dpo, ipo): ``prompt_ids``, ``chosen_ids``, ``rejected_ids``;
* ``cpo`` (ORPOTrainer, CPOTrainer; losses orpo, simpo): ``prompt_input_ids``, ``prompt_attention_mask``,
  ``chosen_input_ids`` (prompt + reply), ``chosen_attention_mask``, ``chosen_labels`` (-100 over the
  prompt, the reply ids after it), the same three for ``rejected``;
* ``kto`` (KTOTrainer): ``prompt_ids``, ``completion_ids``, ``label``; a pair gives a desirable (chosen) and
  an undesirable (rejected) example.

Truncation, with ``max_length`` (prompt + longest reply) and ``max_prompt_length``: a prompt over
``max_prompt_length`` keeps its last tokens (and its leading BOS token, when it has one); then replies that
do not fit are cut at the end to the room left. A pair is dropped when no reply token would fit, or when the
cut makes both replies the same. With ``truncation="drop"`` every over-long example is dropped instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zhtune.atomic import atomic_dir
from zhtune.config.args import DataArgs
from zhtune.errors import ConfigError, DataError
from zhtune.model.default import cache_root
from zhtune.text.encode import IGNORE, SegmentEncoder
from zhtune.text.preference import Pair, Unpaired, read_preferences
from zhtune.text.records import ReadStats, dataset_from_generator, list_data_files
from zhtune.text.templates import ChatFormat, Message
from zhtune.train.sft_data import tokenizer_digest

log = logging.getLogger(__name__)
PREF_ENCODE_VERSION = "1"  # bump when encoding changes, to invalidate caches
LAYOUTS = ("dpo", "cpo", "kto")
LOSS_LAYOUT = {"dpo": "dpo", "ipo": "dpo", "orpo": "cpo", "simpo": "cpo", "kto": "kto"}
KEPT = ("ok", "prompt_cut", "reply_cut", "both_cut")
DROPPED = ("too_long", "no_room", "same_after_cut")


@dataclass
class PrefReport:
    records: int = 0
    bad_records: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    examples: int = 0  # after unpairing, for KTO
    ok: int = 0
    prompt_cut: int = 0
    reply_cut: int = 0
    both_cut: int = 0
    too_long: int = 0
    no_room: int = 0
    same_after_cut: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    cached: bool = False

    def table(self) -> str:
        rows = [
            ("records read", self.records),
            ("bad records skipped", self.bad_records),
            ("examples", self.examples),
            ("kept as is", self.ok),
            ("kept, prompt start cut", self.prompt_cut),
            ("kept, reply end cut", self.reply_cut),
            ("kept, both cut", self.both_cut),
            ("dropped: too long (--truncation drop)", self.too_long),
            ("dropped: no room for a reply", self.no_room),
            ("dropped: replies the same once cut", self.same_after_cut),
            ("train samples", self.train_samples),
            ("eval samples", self.eval_samples),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"  {name:<{width}}  {val}" for name, val in rows]
        if self.formats:
            lines.append(f"  {'formats':<{width}}  " + ", ".join(f"{k} {v}" for k, v in self.formats.items()))
        for reason, n in sorted(self.bad_reasons.items(), key=lambda x: -x[1])[:5]:
            lines.append(f"    {n} x {reason}")
        return "\n".join(lines)


def encode_reply(
    fmt: ChatFormat, enc: SegmentEncoder, prompt: list[Message], reply: str
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, reply_ids)``: the segments SFT would encode for ``prompt + [reply]``, split before the
    reply's supervised segment; template text after it (a newline between turns) belongs to neither."""
    segs = fmt.segments(list(prompt) + [{"role": "assistant", "content": reply}])
    k = max(i for i, (_, supervised) in enumerate(segs) if supervised)
    parts = [enc.encode(text, first=(i == 0)) for i, (text, _) in enumerate(segs[: k + 1])]
    return [x for part in parts[:k] for x in part], parts[k]


def encode_pair(fmt: ChatFormat, enc: SegmentEncoder, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)``, untruncated."""
    prompt_ids, chosen_ids = encode_reply(fmt, enc, pair.prompt, pair.chosen)
    prompt_again, rejected_ids = encode_reply(fmt, enc, pair.prompt, pair.rejected)
    if prompt_again != prompt_ids:
        raise ConfigError(
            "the chat template renders the prompt differently depending on the reply; choose a built-in --template"
        )
    return prompt_ids, chosen_ids, rejected_ids


def truncate(
    prompt_ids: list[int],
    replies: list[list[int]],
    max_length: int,
    max_prompt_length: int | None = None,
    bos_id: int | None = None,
    truncation: str = "auto",
) -> tuple[list[int], list[list[int]], str]:
    """Apply the module's truncation rule. Returns ``(prompt_ids, replies, status)``, status one of
    :data:`KEPT` (kept) or :data:`DROPPED` (the ids are then meaningless)."""
    prompt_over = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    longest = max(len(r) for r in replies)
    if not prompt_over and len(prompt_ids) + longest <= max_length:
        return prompt_ids, replies, "ok"
    if truncation == "drop":
        return prompt_ids, replies, "too_long"
    if prompt_over:
        keep = max_prompt_length
        head = prompt_ids[:1] if bos_id is not None and prompt_ids[:1] == [bos_id] and keep > 1 else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)) :]
    room = max_length - len(prompt_ids)
    if room < 1:
        return prompt_ids, replies, "no_room"
    reply_over = longest > room
    if reply_over:
        replies = [r[:room] for r in replies]
        if len(replies) > 1 and len({tuple(r) for r in replies}) < len(replies):
            return prompt_ids, replies, "same_after_cut"
    return (
        prompt_ids,
        replies,
        {(True, False): "prompt_cut", (False, True): "reply_cut"}.get((prompt_over, reply_over), "both_cut"),
    )


def cpo_columns(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]
) -> dict[str, list[int]]:
    """The ORPO/CPO layout of one pair: full sequences, all-ones attention masks, labels -100 over the prompt."""
    out = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for side, reply in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        out[f"{side}_input_ids"] = prompt_ids + reply
        out[f"{side}_attention_mask"] = [1] * (len(prompt_ids) + len(reply))
        out[f"{side}_labels"] = [IGNORE] * len(prompt_ids) + reply
    return out


def encode_example(
    fmt: ChatFormat,
    enc: SegmentEncoder,
    item: Pair | Unpaired,
    layout: str,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "auto",
) -> tuple[dict[str, Any], str]:
    """One example in ``layout``'s columns, truncated; returns ``(row, status)``."""
    bos = getattr(enc.tok, "bos_token_id", None)
    if layout == "kto":
        assert isinstance(item, Unpaired)
        prompt_ids, completion = encode_reply(fmt, enc, item.prompt, item.completion)
        prompt_ids, (completion,), status = truncate(
            prompt_ids, [completion], max_length, max_prompt_length, bos, truncation
        )
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "label": item.label}, status
    assert isinstance(item, Pair)
    prompt_ids, chosen, rejected = encode_pair(fmt, enc, item)
    prompt_ids, (chosen, rejected), status = truncate(
        prompt_ids, [chosen, rejected], max_length, max_prompt_length, bos, truncation
    )
    if layout == "dpo":
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}, status
    return cpo_columns(prompt_ids, chosen, rejected), status


def _features(layout: str) -> Any:
    import datasets

    ids = datasets.Sequence(datasets.Value("int64"))
    cols = {
        "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
        "kto": ("prompt_ids", "completion_ids"),
        "cpo": tuple(
            f"{s}_{c}" for s in ("prompt", "chosen", "rejected") for c in ("input_ids", "attention_mask")
        )
        + ("chosen_labels", "rejected_labels"),
    }[layout]
    feats = {c: ids for c in cols}
    if layout == "kto":
        feats["label"] = datasets.Value("bool")
    return datasets.Features({**feats, "status": datasets.Value("string")})


def pref_cache_key(
    paths: list[Path],
    tokenizer: Any,
    fmt: ChatFormat,
    d: DataArgs,
    layout: str,
    max_prompt_length: int | None,
) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(json.dumps(fmt.to_json(), sort_keys=True, ensure_ascii=False).encode())
    h.update(fmt.jinja().encode())
    opts = [layout, d.max_seq_length, max_prompt_length, d.truncation, d.system_prompt, d.skip_bad_records]
    h.update(json.dumps(opts + [PREF_ENCODE_VERSION]).encode())
    return h.hexdigest()[:16]


def _gen(paths: list[str], kind: str, skip_bad: bool, system_prompt: str | None, stats_path: str):
    stats = ReadStats()
    for _file, _line, item in read_preferences(
        [Path(p) for p in paths], kind=kind, skip_bad_records=skip_bad, stats=stats
    ):
        prompt = item.prompt
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        row = {"prompt": json.dumps(prompt, ensure_ascii=False)}
        if isinstance(item, Pair):
            row.update(chosen=item.chosen, rejected=item.rejected)
        else:
            row.update(completion=item.completion, label=item.label)
        yield row
    Path(stats_path).write_text(json.dumps(asdict(stats)), encoding="utf-8")


def _encode_batch(batch: dict[str, list], fmt: ChatFormat, tokenizer: Any, layout: str, opts: dict) -> dict:
    enc = SegmentEncoder(tokenizer)
    out: dict[str, list] = {}
    for i, prompt_json in enumerate(batch["prompt"]):
        prompt = json.loads(prompt_json)
        if layout == "kto":
            item: Pair | Unpaired = Unpaired(prompt, batch["completion"][i], batch["label"][i])
        else:
            item = Pair(prompt, batch["chosen"][i], batch["rejected"][i])
        row, status = encode_example(fmt, enc, item, layout, **opts)
        for k, v in {**row, "status": status}.items():
            out.setdefault(k, []).append(v)
    return out


def tokenize_preference_files(
    paths: list[Path],
    tokenizer: Any,
    fmt: ChatFormat,
    d: DataArgs,
    cache_dir: Path,
    split: str,
    *,
    layout: str,
    max_prompt_length: int | None = None,
) -> tuple[Any, PrefReport]:
    """Read, encode and cache one split in ``layout``'s columns. Returns (dataset, report)."""
    import datasets

    target = (
        cache_dir
        / f"pref-{layout}-{split}-{pref_cache_key(paths, tokenizer, fmt, d, layout, max_prompt_length)}"
    )
    if target.is_dir() and not d.overwrite_cache:
        report = PrefReport(**json.loads((target / "zhtune_report.json").read_text(encoding="utf-8")))
        report.cached = True
        log.info("loaded tokenized %s preference set from cache %s", split, target)
        return datasets.load_from_disk(str(target)), report
    with tempfile.TemporaryDirectory(prefix="zhtune-read-") as tmp:
        stats_path = str(Path(tmp) / "stats.json")
        kind = "unpaired" if layout == "kto" else "pair"
        gen_kwargs = {
            "paths": [str(p) for p in paths],
            "kind": kind,
            "skip_bad": d.skip_bad_records,
            "system_prompt": d.system_prompt,
            "stats_path": stats_path,
        }
        raw = dataset_from_generator(_gen, gen_kwargs, cache_dir=str(Path(tmp) / "gen"))
        stats = ReadStats(**json.loads(Path(stats_path).read_text(encoding="utf-8")))
        report = PrefReport(
            records=stats.records, bad_records=stats.bad, bad_reasons=stats.problems, formats=stats.formats
        )
        if len(raw) == 0:
            raise DataError(
                paths[0], None, f"no usable record in {len(paths)} file(s): {report.bad_records} bad"
            )
        opts = {
            "max_length": d.max_seq_length,
            "max_prompt_length": max_prompt_length,
            "truncation": d.truncation,
        }
        workers = d.preprocessing_num_workers if (d.preprocessing_num_workers or 0) > 1 else None
        encoded = raw.map(
            _encode_batch,
            batched=True,
            batch_size=256,
            num_proc=workers,
            fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "layout": layout, "opts": opts},
            remove_columns=raw.column_names,
            features=_features(layout),
            desc=f"Tokenizing {split} pairs",
        )
        report.examples = len(encoded)
        for s in encoded["status"]:
            setattr(report, s, getattr(report, s) + 1)
        kept = encoded.filter(lambda b: [s in KEPT for s in b["status"]], batched=True, desc="Filtering")
        kept = kept.remove_columns(["status"])
        with atomic_dir(target, overwrite=True) as out:
            kept.save_to_disk(str(out))
            (out / "zhtune_report.json").write_text(json.dumps(asdict(report)), encoding="utf-8")
    return datasets.load_from_disk(str(target)), report


def build_preference_data(
    tokenizer: Any,
    fmt: ChatFormat,
    d: DataArgs,
    *,
    layout: str,
    seed: int,
    max_prompt_length: int | None = None,
) -> tuple[Any, Any | None, PrefReport]:
    """Training and optional validation sets in ``layout``'s columns (see :data:`LOSS_LAYOUT`), with a report.

    Data options come from ``d`` as for SFT: files, ``max_seq_length`` (prompt + reply), ``truncation``,
    ``system_prompt``, ``skip_bad_records``, validation, sample caps and the cache.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown preference layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if max_prompt_length is not None and not 0 < max_prompt_length < d.max_seq_length:
        raise ConfigError(
            f"--max_prompt_length {max_prompt_length} must be positive and below --max_seq_length "
            f"{d.max_seq_length}, to leave room for the reply"
        )
    paths = list_data_files(d.dataset_dir, d.train_files)
    if not paths:
        raise DataError("<config>", None, "no training data: pass --dataset_dir or --train_files")
    cache_dir = Path(d.data_cache_dir) if d.data_cache_dir else cache_root() / "datasets"
    kw = {"layout": layout, "max_prompt_length": max_prompt_length}
    train, report = tokenize_preference_files(paths, tokenizer, fmt, d, cache_dir, "train", **kw)
    eval_ds = None
    if d.validation_file:
        eval_ds, _ = tokenize_preference_files(
            [Path(d.validation_file)], tokenizer, fmt, d, cache_dir, "eval", **kw
        )
    elif d.validation_split_percentage > 0 and len(train) > 1:
        n_eval = max(1, int(round(len(train) * d.validation_split_percentage / 100)))
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    train = train.shuffle(seed=seed)
    if d.max_train_samples:
        train = train.select(range(min(d.max_train_samples, len(train))))
    if eval_ds is not None and d.max_eval_samples:
        eval_ds = eval_ds.select(range(min(d.max_eval_samples, len(eval_ds))))
    if len(train) == 0:
        raise DataError(
            paths[0],
            None,
            f"no usable training example: {report.records} records read, {report.bad_records} bad, "
            f"{report.no_room + report.too_long + report.same_after_cut} dropped as too long for "
            f"--max_seq_length {d.max_seq_length}",
        )
    report.train_samples = len(train)
    report.eval_samples = len(eval_ds) if eval_ds is not None else 0
    return train, eval_ds, report
