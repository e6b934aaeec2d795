"""Replies never hold a broken character: the UTF-8 guard's masks, the detokenizer's end, a forced model."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, make_tiny_model

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.infer import utf8
from zhtune.infer.engine import Engine, EngineArgs
from zhtune.infer.stream import Detokenizer, Job

TOKENIZERS = ["bpe_tokenizer_dir", "sp_tokenizer_dir"]
TEXTS = [*CORPUS[:10], "表情😀与符号½、é，还有 𠀀 生僻字。", "  leading spaces\tand\nnew lines"]
# every completion of a partial character, up to the byte ranges that matter (see Utf8Guard)
COMPLETIONS = [b""] + [bytes([f]) + b"\x80" * r for f in (0x80, 0x90, 0xA0, 0xBF) for r in range(3)]


def tokenizer(request, name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(request.getfixturevalue(name)))


def byte_id(tok, b: int) -> int:
    """The token of the single byte ``b``: <0xNN> (SentencePiece byte fallback) or its byte-level letter."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    piece = f"<0x{b:02X}>" if "<0x00>" in tok.get_vocab() else bytes_to_unicode()[b]
    i = tok.convert_tokens_to_ids(piece)
    assert i is not None and i != tok.unk_token_id, piece
    return i


def completable(data: bytes) -> bool:
    """Independent of the guard: Python's strict decoder accepts ``data`` plus some completion."""
    for c in COMPLETIONS:
        try:
            (data + c).decode("utf-8")
            return True
        except UnicodeDecodeError:
            pass
    return False


@pytest.mark.parametrize("name", TOKENIZERS)
def test_token_bytes_decode_as_the_tokenizer_does(request, name):
    tok = tokenizer(request, name)
    table = utf8.token_bytes(tok)
    assert len(table) == len(tok) and all(table[i] is None for i in tok.all_special_ids)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ours = b"".join(table[i] for i in ids).decode("utf-8")
        assert ours.lstrip(" ") == tok.decode(ids).lstrip(" ")
        assert utf8.check_bytes(tok, table, text)
    assert table[byte_id(tok, 0xE5)] == b"\xe5"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_guard_masks_exactly_the_tokens_that_break_a_character(request, name):
    tok = tokenizer(request, name)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    guard = utf8.Utf8Guard.for_tokenizer(tok, always=[eos])
    table = utf8.token_bytes(tok)
    good = tok("好", add_special_tokens=False)["input_ids"]
    prefixes = [
        good,  # between characters
        [byte_id(tok, 0xE5)],  # 好 is E5 A5 BD
        [byte_id(tok, 0xE5), byte_id(tok, 0xA5)],
        [byte_id(tok, 0xE0)],  # only A0-BF may follow (no overlong form)
        [byte_id(tok, 0xED)],  # only 80-9F may follow (no surrogate)
        [byte_id(tok, 0xF0), byte_id(tok, 0x9F)],  # 😀 is F0 9F 98 80
        [byte_id(tok, 0xF0), byte_id(tok, 0x9F), byte_id(tok, 0x98)],
        [byte_id(tok, 0xF4)],  # only 80-8F may follow (nothing above U+10FFFF)
        [*good, byte_id(tok, 0xC3)],
    ]
    vocab = len(tok)
    masked_somewhere = 0
    for prefix in prefixes:
        data = b"".join(table[i] for i in prefix)
        scores = guard(torch.tensor([prefix]), torch.zeros(1, vocab))[0]
        inside = data.decode("utf-8", "ignore").encode() != data
        for i in range(vocab):
            if table[i] is None:
                want = i == eos or not inside
            else:
                want = completable(data + table[i])
            assert (scores[i].item() == 0) == want, (prefix, i, table[i])
        masked_somewhere += int((scores == float("-inf")).sum())
        if inside:  # a stop token may end the reply; other special tokens may not split a character
            assert scores[eos] == 0 and scores[bos] == float("-inf")
    assert masked_somewhere > len(prefixes) * 100  # the masks are not empty


@pytest.mark.parametrize("name", TOKENIZERS)
def test_guard_never_masks_valid_text(request, name):
    tok = tokenizer(request, name)
    guard = utf8.Utf8Guard.for_tokenizer(tok)
    for text in TEXTS:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        for t in range(1, len(ids)):  # each next token of valid text is allowed after the tokens before it
            scores = guard(torch.tensor([ids[:t]]), torch.zeros(1, len(tok)))
            assert scores[0, ids[t]] == 0, (text, t)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_reply_ending_inside_a_character_never_shows_u_fffd(request, name):
    tok = tokenizer(request, name)
    ids = tok("北京", add_special_tokens=False)["input_ids"] + [byte_id(tok, 0xE5), byte_id(tok, 0xA5)]
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in ids] + [d.push([], final=True)]
    assert "".join(pieces).strip() == "北京" and not any("\ufffd" in p for p in pieces)
    assert "\ufffd" in tok.decode(ids)  # what a plain decode would have shown
    job = Job([1], GenerationArgs(), max_new_tokens=len(ids), tokenizer=tok)
    job.set_tokens(ids)
    assert job.run().text.strip() == "北京" and job.finish_reason == "length"
    whole = ids + [byte_id(tok, 0xBD)]  # the character completed: shown whole, as decode shows it
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in whole] + [d.push([], final=True)]
    assert "".join(pieces) == tok.decode(whole) and "".join(pieces).strip() == "北京好"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_finished_character_before_an_unfinished_one_is_kept_however_the_tokens_arrive(request, name):
    """SentencePiece's byte fallback decodes an invalid run of byte tokens as U+FFFD for every byte, so
    E5 A5 A5 E5 (奥 and a lead byte) decodes as four U+FFFD; a consumer that received those tokens in one
    step (it lagged behind the backend) once lost 奥 with the unfinished character."""
    tok = tokenizer(request, name)
    e5, a5 = byte_id(tok, 0xE5), byte_id(tok, 0xA5)
    head = tok("北京", add_special_tokens=False)["input_ids"]
    for tail, want in (
        ([e5, a5, a5, e5], "北京奥"),
        ([e5, a5, a5, e5, a5], "北京奥"),
        ([e5, a5, a5], "北京奥"),
    ):
        ids = head + tail
        assert tok.decode(head + [e5, a5, a5]).strip() == "北京奥"
        for cuts in range(2 ** (len(ids) - 1)):  # every split of the tokens into the steps that receive them
            d, pieces, start = Detokenizer(tok), [], 0
            for k in range(1, len(ids) + 1):
                if k == len(ids) or cuts >> (k - 1) & 1:
                    pieces.append(d.push(ids[start:k], final=k == len(ids)))
                    start = k
            assert "".join(pieces).strip() == want and d.text.strip() == want, (tail, cuts, pieces)
            assert not any("\ufffd" in p for p in pieces)
        job = Job([1], GenerationArgs(), max_new_tokens=len(ids), tokenizer=tok)
        job.set_tokens(ids, finished=True)  # the consumer reads only after the backend finished
        assert job.run().text.strip() == want and job.finish_reason == "length"


def forced_model(tok_dir, out, prefer: list[int]):
    """A model whose logits are the same after any prompt: ``prefer`` in order, every other token 0."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_tiny_model(tok_dir, out)
    AutoTokenizer.from_pretrained(str(tok_dir))
    model = LlamaForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token the same vector ...
        for layer in model.model.layers:  # ... that no layer changes
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for rank, i in enumerate(prefer):
            model.lm_head.weight[i, 0] = float(len(prefer) - rank)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("backend", ["generate", "static", "continuous"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_model_forced_to_break_characters_writes_whole_ones(request, tmp_path, name, backend):
    tok = tokenizer(request, name)
    e5, a5, a = byte_id(tok, 0xE5), byte_id(tok, 0xA5), byte_id(tok, ord("a"))
    path = forced_model(request.getfixturevalue(name), tmp_path / "m", [e5, a, a5])
    engine = Engine.load(ModelArgs(model_name_or_path=str(path)), EngineArgs(backend=backend))
    engine.start(backend)
    prompt = engine.prompt_ids([{"role": "user", "content": "你好"}])
    if backend == "continuous":  # on a CPU batches are prepared one after the other: the guard is in
        assert engine.backend.utf8_guard
    try:
        if backend != "continuous":  # (its paged attention runs only inside continuous batching)
            unguarded = engine.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert unguarded[0, len(prompt) :].tolist() == [e5] * 6  # lead bytes only: broken text
            assert "\ufffd" in tok.decode(unguarded[0, len(prompt) :])
        for n, want in ((6, "奥奥"), (7, "奥奥"), (8, "奥奥"), (1, ""), (4, "奥")):  # 奥 is E5 A5 A5
            g = GenerationArgs(max_new_tokens=n, temperature=0, repetition_penalty=1.0)
            job = engine.submit(engine.job(prompt, g))
            pieces = list(job)
            r = job.reply()
            assert (r.text, r.completion_tokens, r.finish_reason) == (want, n, "length")
            assert not any("\ufffd" in p for p in pieces)
    finally:
        engine.close()


def test_continuous_batching_without_the_guard_breaks_characters(request, tmp_path, monkeypatch):
    """The control for the continuous row above: the same forced model, the guard left out, breaks every
    character it starts."""
    from zhtune.infer import utf8_continuous

    tok = tokenizer(request, "bpe_tokenizer_dir")
    e5, a5, a = byte_id(tok, 0xE5), byte_id(tok, 0xA5), byte_id(tok, ord("a"))
    path = forced_model(request.getfixturevalue("bpe_tokenizer_dir"), tmp_path / "m", [e5, a, a5])
    monkeypatch.setattr(utf8_continuous, "install", lambda manager, guard: False)
    engine = Engine.load(ModelArgs(model_name_or_path=str(path)), EngineArgs(backend="continuous"))
    engine.start("continuous")
    try:
        prompt = engine.prompt_ids([{"role": "user", "content": "你好"}])
        g = GenerationArgs(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
        job = engine.submit(engine.job(prompt, g))
        assert job.run().completion_tokens == 6
        # six lead bytes, no character among them: the stream shows nothing of them, where the guard wrote 奥奥
        assert job.token_ids() == [e5] * 6 and job.text() == ""
        assert not engine.backend.utf8_guard
    finally:
        engine.close()
