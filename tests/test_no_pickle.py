"""No pickle and no remote code: a scan of the sources, the pickle-free training state round trip, and the
explicit flag for legacy pickle state files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zhtune.errors import ConfigError
from zhtune.train.state import StateFormatError, load_legacy, load_state, rng_states, save_state

SRC = Path(__file__).resolve().parents[1] / "src" / "zhtune"


def calls(pattern: str) -> list[str]:
    hits = []
    for p in sorted(SRC.rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(pattern, text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{p.relative_to(SRC)}:{line}: {text.splitlines()[line - 1].strip()}")
    return hits


def test_sources_write_no_pickle_and_load_tensors_only():
    loads = calls(r"torch\.load\(")
    assert loads and all("weights_only=True" in h for h in loads), loads
    # the one pickle read: langid's own model string shipped inside the installed langid package (langid reads
    # it the same way), converted once to an .npz read with allow_pickle=False; never a user's file
    pickles = [h for h in calls(r"torch\.save\(|pickle\.(load|dump)|import pickle|import dill|cloudpickle")]
    assert [h.split(":")[0] for h in pickles] == ["data/filter_lang.py"] * 2, pickles
    assert not calls(r"trust_remote_code\s*=\s*True")  # only ever the user's --trust_remote_code
    assert not calls(r"safe_serialization\s*=\s*False")


def test_training_state_round_trips_exactly_without_pickle(tmp_path):
    sgd = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.95))
    sgd.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    sgd.step()
    obj = {
        "opt": sgd.state_dict(),
        "rng": rng_states(cuda_all=False),
        "weird": {1: (float("nan"), float("-inf"), 0.1 + 0.2), "k": [None, True, "中文"]},
        "np": np.arange(5, dtype=np.uint32),
    }
    files = save_state(obj, tmp_path, "s")
    assert sorted(f.name for f in files) == ["s.json", "s.safetensors"]
    back = load_state(tmp_path, "s")
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], obj["opt"]["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["rng"]["python"] == obj["rng"]["python"] and torch.equal(
        back["rng"]["cpu"], obj["rng"]["cpu"]
    )
    assert np.array_equal(back["rng"]["numpy"][1], obj["rng"]["numpy"][1])
    w = back["weird"][1]
    assert (
        np.isnan(w[0])
        and w[1] == float("-inf")
        and w[2] == 0.1 + 0.2
        and back["weird"]["k"] == [None, True, "中文"]
    )
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="without pickle"):
        save_state({"f": lambda: 0}, tmp_path, "bad")
    (tmp_path / "s.json").write_text('{"format": "zhtune-state-1", "tens')
    with pytest.raises(StateFormatError, match="s.json is not valid JSON"):
        load_state(tmp_path, "s")


def test_legacy_pickle_needs_the_flag_and_reads_tensors_only(tmp_path):
    import os

    p = tmp_path / "optimizer.pt"
    with open(p, "wb") as f:  # a legacy state file as plain transformers writes it
        import io

        buf = io.BytesIO()
        torch.serialization.save({"state": {0: torch.ones(2)}}, buf)
        f.write(buf.getvalue())
    with pytest.raises(ConfigError, match="optimizer.pt is a pickle .*--allow_pickle"):
        load_legacy(p, allow_pickle=False)
    assert torch.equal(load_legacy(p, allow_pickle=True)["state"][0], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "rng_state.pth"
    buf = io.BytesIO()
    torch.serialization.save({"x": Evil()}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_legacy(evil, allow_pickle=True)  # even with the flag, code objects are refused
