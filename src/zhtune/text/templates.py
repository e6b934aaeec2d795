"""Chat templates as text segments, each marked supervised or not.

A conversation is rendered into an ordered list of ``(text, supervised)`` segments. Training labels,
inference prompts and the Jinja template saved with the tokenizer all come from that one rendering:

* built-in templates (``templates.yaml``) are structured, so their segments are exact by construction, and
  a Jinja equivalent is generated for other tools (vLLM, llama.cpp, ``apply_chat_template``);
* a model's own Jinja template is segmented by rendering growing prefixes of the conversation: the text an
  assistant message adds is supervised up to and including its end-of-turn token, the rest is template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from zhtune.errors import ConfigError

Message = dict[str, str]
Segment = tuple[str, bool]

SIDECAR = "zhtune_template.json"
KNOWN_END_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<|user|>",
    "<|observation|>",
)
FIELDS = (
    "bos",
    "system",
    "first_user_with_system",
    "default_system",
    "user",
    "assistant_start",
    "assistant",
    "assistant_end",
    "turn_end",
    "description",
)


@functools.cache
def builtin_specs() -> dict[str, dict[str, Any]]:
    text = resources.files("zhtune.text").joinpath("templates.yaml").read_text(encoding="utf-8")
    specs = yaml.safe_load(text)
    for name, spec in specs.items():
        unknown = set(spec) - set(FIELDS)
        if unknown:
            raise RuntimeError(f"templates.yaml: {name} has unknown fields {sorted(unknown)}")
    return specs


def builtin_names() -> list[str]:
    return list(builtin_specs())


def _split_messages(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


class BuiltinFormat:
    """A structured template from templates.yaml."""

    def __init__(self, name: str, spec: dict[str, Any], tokenizer: Any):
        self.name = name
        self.spec = {k: spec.get(k) for k in FIELDS}
        for k in ("bos", "system", "user", "assistant_start", "assistant_end", "turn_end"):
            self.spec[k] = self.spec[k] or ""
        self.spec["assistant"] = self.spec["assistant"] or "{content}"
        self.bos_token = getattr(tokenizer, "bos_token", None) or ""
        self.eos_token = getattr(tokenizer, "eos_token", None) or ""

    def _fill(self, fmt: str, content: str = "", system: str = "") -> str:
        # str.replace, not str.format: message text may contain braces
        return (
            fmt.replace("{bos_token}", self.bos_token)
            .replace("{eos_token}", self.eos_token)
            .replace("{system}", system)
            .replace("{content}", content)
        )

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        s = self.spec
        system, rest = _split_messages(messages)
        if system is None:
            system = s["default_system"]
        segs: list[Segment] = [(self._fill(s["bos"]), False)]
        system_in_user = bool(system) and not s["system"] and s["first_user_with_system"]
        if system and s["system"]:
            segs.append((self._fill(s["system"], system), False))
        for i, m in enumerate(rest):
            if m["role"] == "user":
                if i == 0 and system_in_user:
                    segs.append((self._fill(s["first_user_with_system"], m["content"], system), False))
                else:
                    segs.append((self._fill(s["user"], m["content"]), False))
                segs.append((self._fill(s["assistant_start"]), False))
            elif m["role"] == "assistant":
                segs.append((self._fill(s["assistant"], m["content"]) + self._fill(s["assistant_end"]), True))
                segs.append((self._fill(s["turn_end"]), False))
        if rest and rest[-1]["role"] == "user" and not add_generation_prompt:
            segs.pop()  # no assistant_start after a trailing user turn unless a reply is wanted
        return _merge([x for x in segs if x[0]])

    def stop_strings(self) -> list[str]:
        stops = [self._fill(self.spec["assistant_end"])]
        if self.eos_token and self.eos_token not in stops:
            stops.append(self.eos_token)
        return [x for x in stops if x]

    def jinja(self) -> str:
        return builtin_jinja(self.spec)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spec": {k: v for k, v in self.spec.items() if v is not None}}


def _merge(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for text, sup in segs:
        if out and out[-1][1] == sup:
            out[-1] = (out[-1][0] + text, sup)
        else:
            out.append((text, sup))
    return out


def _jinja_expr(fmt: str) -> str:
    """A Jinja expression concatenating literals and the bos/eos/content/system variables."""
    parts: list[str] = []
    i = 0
    names = {
        "{bos_token}": "bos_token",
        "{eos_token}": "eos_token",
        "{content}": "content",
        "{system}": "system",
    }
    buf = ""
    while i < len(fmt):
        for ph, var in names.items():
            if fmt.startswith(ph, i):
                if buf:
                    parts.append(json.dumps(buf, ensure_ascii=False))
                    buf = ""
                parts.append(var)
                i += len(ph)
                break
        else:
            buf += fmt[i]
            i += 1
    if buf:
        parts.append(json.dumps(buf, ensure_ascii=False))
    return " + ".join(parts) if parts else '""'


def builtin_jinja(spec: dict[str, Any]) -> str:
    """Generate a Jinja chat template that renders exactly like the structured one."""
    default = json.dumps(spec.get("default_system") or "", ensure_ascii=False)
    has_sys_fmt = bool(spec.get("system"))
    fuws = spec.get("first_user_with_system") or ""
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        "{%- set system = " + default + " -%}{%- set loop_messages = messages -%}",
        "{%- endif -%}",
        "{{- " + _jinja_expr(spec.get("bos") or "") + " -}}",
    ]
    if has_sys_fmt:
        lines.append(
            "{%- if system -%}{%- set content = system -%}{{- "
            + _jinja_expr(spec["system"])
            + " -}}{%- endif -%}"
        )
    lines.append("{%- for message in loop_messages -%}{%- set content = message['content'] -%}")
    lines.append("{%- if message['role'] == 'user' -%}")
    if fuws and not has_sys_fmt:
        lines.append(
            "{%- if loop.first and system -%}{{- "
            + _jinja_expr(fuws)
            + " -}}{%- else -%}{{- "
            + _jinja_expr(spec["user"])
            + " -}}{%- endif -%}"
        )
    else:
        lines.append("{{- " + _jinja_expr(spec["user"]) + " -}}")
    lines.append(
        "{%- if not loop.last or add_generation_prompt -%}{{- "
        + _jinja_expr(spec.get("assistant_start") or "")
        + " -}}{%- endif -%}"
    )
    lines.append("{%- elif message['role'] == 'assistant' -%}")
    lines.append(
        "{{- "
        + _jinja_expr((spec.get("assistant") or "{content}") + (spec.get("assistant_end") or ""))
        + " + "
        + _jinja_expr(spec.get("turn_end") or "")
        + " -}}"
    )
    lines.append("{%- endif -%}{%- endfor -%}")
    return "".join(lines)


class JinjaFormat:
    """A model's own Jinja chat template, segmented by rendering growing prefixes."""

    name = "model"

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template or tokenizer.chat_template
        if not self.template:
            raise ConfigError("the tokenizer has no chat template; pick a built-in with --template")
        self.eos_token = getattr(tokenizer, "eos_token", None) or ""
        self._stops: list[str] | None = None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # noqa: BLE001 - template errors come from user-supplied Jinja
            raise ConfigError(f"the model's chat template failed to render: {e}") from e

    def _candidates(self) -> list[str]:
        # markers count where the template writes them, whether or not they are single tokens
        cands = list(KNOWN_END_TOKENS)
        if self.eos_token and self.eos_token not in cands:
            cands.insert(0, self.eos_token)
        return cands

    def _split_assistant(self, text: str, content: str) -> tuple[str, str]:
        """Split an assistant message's rendering into (supervised, template-after)."""
        probe = content.strip()
        start = text.find(probe) if probe else 0
        if start < 0:
            raise ConfigError(
                "the model's chat template changes assistant text; choose a built-in --template"
            )
        after = start + len(probe)
        best = None
        for tok in self._candidates():
            j = text.find(tok, after)
            if j >= 0 and (best is None or j < best[0]):
                best = (j, tok)
        if best is None:
            # the template writes no end-of-turn token: supervise the eos so the model learns to stop
            return text + self.eos_token, ""
        end = best[0] + len(best[1])
        return text[:end], text[end:]

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        msgs = list(messages)
        segs: list[Segment] = []
        done = ""  # rendering covered so far
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:i], add_generation_prompt=True)
            through = self.render(msgs[: i + 1])
            if not before.startswith(done) or not through.startswith(before):
                raise ConfigError(
                    "the model's chat template does not render conversations prefix by prefix (it rewrites "
                    "earlier turns), so labels cannot be placed exactly; choose a built-in --template"
                )
            segs.append((before[len(done) :], False))
            sup, tail = self._split_assistant(through[len(before) :], m["content"])
            segs.append((sup, True))
            segs.append((tail, False))
            done = through
        full = self.render(msgs, add_generation_prompt=add_generation_prompt and msgs[-1]["role"] == "user")
        if not full.startswith(done):
            raise ConfigError(
                "the model's chat template is not prefix-consistent; choose a built-in --template"
            )
        segs.append((full[len(done) :], False))
        return _merge([s for s in segs if s[0]])

    def stop_strings(self) -> list[str]:
        if self._stops is None:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            try:
                sup = [t for t, s in self.segments(probe) if s]
                found = [c for c in self._candidates() if sup and sup[0].endswith(c)]
            except ConfigError:
                found = []
            stops = found + ([self.eos_token] if self.eos_token and self.eos_token not in found else [])
            self._stops = stops
        return list(self._stops)

    def jinja(self) -> str:
        return self.template

    def to_json(self) -> dict[str, Any]:
        return {"name": "model"}


ChatFormat = BuiltinFormat | JinjaFormat


def get_format(tokenizer: Any, name: str | None = None, directory: str | Path | None = None) -> ChatFormat:
    """The chat format to use.

    ``name``: a built-in, ``model`` for the tokenizer's own Jinja template, or None: a template recorded
    by zhtune next to the tokenizer, else the tokenizer's own, else alpaca.
    """
    specs = builtin_specs()
    if name and name != "model":
        if name not in specs:
            raise ConfigError(f"unknown --template {name!r}; built-ins are {', '.join(specs)}, or 'model'")
        return BuiltinFormat(name, specs[name], tokenizer)
    if name is None and directory is not None:
        side = Path(directory) / SIDECAR
        if side.is_file():
            data = json.loads(side.read_text(encoding="utf-8"))
            if data.get("name") != "model":
                return BuiltinFormat(data["name"], data["spec"], tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return JinjaFormat(tokenizer)
    if name == "model":
        raise ConfigError("--template model asked for, but the tokenizer has no chat template")
    return BuiltinFormat("alpaca", specs["alpaca"], tokenizer)


def attach(fmt: ChatFormat, tokenizer: Any) -> None:
    """Make the tokenizer carry the template, so saving it writes the Jinja for other tools."""
    tokenizer.chat_template = fmt.jinja()


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Save a tokenizer with its chat template inside tokenizer_config.json, where every tool looks."""
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)


def write_sidecar(fmt: ChatFormat, directory: str | Path) -> None:
    from zhtune.atomic import atomic_write_text

    atomic_write_text(Path(directory) / SIDECAR, json.dumps(fmt.to_json(), ensure_ascii=False, indent=2))
