"""Perplexity: the sliding window scores every token once, the numbers match hand-computed ones, bad input fails."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from applelm.errors import UserError
from applelm.perplexity import main, perplexity, windows
from conftest import build_tiny

V = 4


class HistoryModel:
    """Logits [h, 0, 0, 0] at each position, h = tokens seen so far in the window: the NLL of token 0 then
    tells how much history the window gave it."""

    def __call__(self, x):
        L = x.shape[1]
        seen = mx.arange(1, L + 1, dtype=mx.float32)
        return mx.concatenate([seen[:, None], mx.zeros((L, V - 1))], axis=1)[None]


def nll_with_history(h: int) -> float:
    return math.log(math.exp(h) + V - 1) - h


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 3), (9, 3, 1), (5, 8, 4), (100, 16, 5), (2, 2, 1)])
def test_windows_score_each_token_once(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored += list(range(first, end))
        for j in range(first, end):  # history in this window: j - begin tokens
            assert min(j, context - stride) <= j - begin <= context - 1
    assert scored == list(range(1, n))


def test_hand_computed_history_model():
    # 10 tokens, context 4, stride 2: windows [0,4) scores 1,2,3 (history 1,2,3), then [2,6) scores 4,5,
    # [4,8) scores 6,7 and [6,10) scores 8,9 (history 2,3 each).
    histories = [1, 2, 3, 2, 3, 2, 3, 2, 3]
    expected = sum(nll_with_history(h) for h in histories) / len(histories)
    r = perplexity(HistoryModel(), [0] * 10, context=4, stride=2)
    assert r.tokens == 9 and (r.context, r.stride) == (4, 2)
    assert r.nll == pytest.approx(expected, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert r.seconds >= 0


def test_matches_explicit_loop_on_tiny_model():
    model, _ = build_tiny("llama")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, 40).tolist()
    # One window holding the whole text: the NLL of every token given all before it.
    logits = np.array(model(mx.array([tokens]))[0], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    full = -np.mean([logp[j - 1, tokens[j]] for j in range(1, 40)])
    r = perplexity(model, tokens, context=64)
    assert r.tokens == 39 and r.nll == pytest.approx(full, rel=1e-4)
    # A short window: each token predicted from the explicit window the loop below builds.
    context, stride = 8, 3
    nlls = []
    for begin, end, first in windows(40, context, stride):
        for j in range(first, end):
            row = np.array(model(mx.array([tokens[begin:j]]))[0, -1], dtype=np.float64)
            nlls.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[j]])
    r = perplexity(model, tokens, context=context, stride=stride)
    assert r.tokens == 39 and r.nll == pytest.approx(float(np.mean(nlls)), rel=1e-4)
    assert abs(r.nll - full) > 1e-3  # the shorter window really changed what the model saw


@pytest.mark.parametrize("context,stride", [(1, None), (0, None), (4, 4), (4, 9)])
def test_bad_window_rejected(context, stride):
    with pytest.raises(UserError):
        perplexity(HistoryModel(), [0] * 10, context=context, stride=stride)


def test_too_few_tokens():
    with pytest.raises(UserError, match="at least 2 tokens"):
        perplexity(HistoryModel(), [0], context=4)


def _cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_missing_text_file(capsys, tmp_path):
    code, err = _cli(capsys, "--text", str(tmp_path / "nope.txt"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_cli_empty_text(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, err = _cli(capsys, "--text", str(empty))
    assert code == 2 and "is empty" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags,message", [(["--context", "1"], "at least 2"), (["--context", "8", "--stride", "8"], "stride")])
def test_cli_bad_window(capsys, tmp_path, flags, message):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    code, err = _cli(capsys, "--text", str(text), *flags)
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_on_a_model_folder(capsys, tmp_path):
    """End to end: a tiny model folder with a tokenizer; the CLI's JSON equals the function's numbers."""
    import json

    from applelm import load
    from applelm.perplexity import text_tokens
    from hf_fixtures import save_folder, write_word_tokenizer

    model, config = build_tiny("qwen2")
    folder = save_folder(model, config, tmp_path / "m")
    write_word_tokenizer(folder)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(60)))
    code = main(["--model", str(folder), "--text", str(text), "--context", "16", "--stride", "5", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["tokens"] == 59 and (out["context"], out["stride"]) == (16, 5)
    m, tok = load(folder)
    ref = perplexity(m, text_tokens(tok, text.read_text()), 16, 5)
    assert out["nll"] == pytest.approx(ref.nll, rel=1e-6) and out["perplexity"] == pytest.approx(ref.perplexity)
    assert main(["--model", str(folder), "--text", str(text), "--max-tokens", "20", "-q"]) == 0
    assert "tokens scored: 19" in capsys.readouterr().out
