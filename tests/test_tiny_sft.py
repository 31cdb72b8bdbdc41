"""The offline tiny model (algos/models/tiny.py) and the SFT step (algos/models/sft.py) + cached warm start (algos/models/warm_start.py)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import algos.models.warm_start as warm_start_module
from algos.models.sft import (IGNORE_INDEX, SFTConfig, sft_examples_to_batches, sft_loss, tokenize_sft_examples,
                              train_sft)
from algos.models.tiny import build_tiny_model, build_tokenizer, count_parameters, tiny_config
from algos.models.warm_start import WARM_START_MARKER, warm_start

GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")
PROMPT = "[MATH_TASK] Problem:\n{question}\n\nSolution:"

# A few GSM8K-style rows, so the tests do not depend on where the data lives.
_FALLBACK_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]


def _rows(n: int) -> list[dict]:
    if GSM8K_TRAIN.is_file():
        with open(GSM8K_TRAIN, encoding="utf-8") as f:
            return [json.loads(line) for _, line in zip(range(n), f)]
    return (_FALLBACK_ROWS * (n // len(_FALLBACK_ROWS) + 1))[:n]


def _examples(n: int) -> list[tuple[str, str]]:
    return [(PROMPT.format(question=r["question"]), "\n" + re.sub(r"<<[^>]*>>", "", r["answer"]))
            for r in _rows(n)]


def _texts(examples):
    return [t for pair in examples for t in pair]


@pytest.fixture(scope="module")
def examples():
    return _examples(300)


@pytest.fixture(scope="module")
def tok(examples):
    return build_tokenizer(_texts(examples), vocab_size=2048)


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x10000, 0x10FFFF)]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(pools)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)


# --- tokenizer ---------------------------------------------------------------------------------


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(0)
    cases = ["", " ", "  \t\r\n\n  ", "héllo wörld", "日本語のテキスト", "🎉👩‍👩‍👧 emoji",
             "e\u0301 combining", "\x00\x01 nul", "<s> </s> <pad> <unk> literal specials",
             "x = 3.14e-10; y=1,000,000", "\\frac{1}{2} $\\boxed{7}$"]
    cases += [_random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]
    for s in cases:
        ids = tok(s, add_special_tokens=False).input_ids
        if "<unk>" not in s:  # a literal special-token string encodes as that special token
            assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s


def test_round_trip_gsm8k_text(tok, examples):
    for prompt, response in _examples(1000)[-700:]:  # mostly text the tokenizer was not trained on
        for s in (prompt, response, prompt + response):
            assert tok.decode(tok(s, add_special_tokens=False).input_ids) == s


def test_digits_are_single_tokens(tok):
    s = "0123456789 and 3.14, 1,000,000 or 2024-12-31: 48+24=72"
    ids = tok(s, add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert [c for c in s if c.isdigit()] == [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert all(p.isdigit() and len(p) == 1 for p in pieces if any(ch.isdigit() for ch in p))
    # and no token of the whole vocabulary holds more than one digit
    for i in range(len(tok)):
        assert sum(ch.isdigit() for ch in tok.decode([i])) <= 1


def test_bos_added_eos_not(tok):
    ids = tok("Janet has 16 eggs.").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert ids[1:] == tok("Janet has 16 eggs.", add_special_tokens=False).input_ids
    assert tok.bos_token_id not in tok("Janet", add_special_tokens=False).input_ids
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.padding_side == "left"


def test_offsets_mapping(tok, examples):
    for prompt, response in examples[:50]:
        s = prompt + response
        enc = tok(s, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        assert offsets[0] == (0, 0)  # BOS
        # the spans tile the text; the byte tokens of one multi-byte character share its span
        spans = [o for k, o in enumerate(offsets[1:]) if k == 0 or o != offsets[k]]
        assert "".join(s[a:b] for a, b in spans) == s
        for (a, b), i in zip(offsets[1:], enc.input_ids[1:]):
            if s[a:b].isascii():
                assert s[a:b] == tok.decode([i])


def test_tokenizer_deterministic(examples, tok):
    again = build_tokenizer(_texts(examples), vocab_size=2048)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = "[MATH_TASK] Problem:\nJanet’s ducks lay 16 eggs per day. 日本 🎉\n\nSolution:"
    assert loaded(s).input_ids == tok(s).input_ids
    assert loaded(s).input_ids[0] == loaded.bos_token_id
    assert loaded.eos_token_id not in loaded(s).input_ids
    assert loaded.decode(loaded(s, add_special_tokens=False).input_ids) == s
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert loaded.padding_side == "left"
    assert loaded(s, return_offsets_mapping=True)["offset_mapping"] == \
        tok(s, return_offsets_mapping=True)["offset_mapping"]
    batch = loaded(["a", "a b c d"], padding=True)
    assert batch.input_ids[0][0] == loaded.pad_token_id  # left padding


def test_build_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size: expected"):
        build_tokenizer(["abc"], vocab_size=10)
    with pytest.raises(ValueError, match="expected an iterable of strings"):
        build_tokenizer("abc")
    with pytest.raises(ValueError, match=r"texts\[1\]: expected str"):
        build_tokenizer(["abc", 3])


# --- model -------------------------------------------------------------------------------------


def test_tiny_model_size_and_tying(tok):
    assert len(tok) == 2048
    cfg = tiny_config(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (256, 4, 4)
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = build_tiny_model(tok)
    n = count_parameters(model)
    assert 4_000_000 <= n <= 20_000_000, n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="hidden_size: expected a multiple of num_heads"):
        tiny_config(tok, hidden_size=30, num_heads=4)


# --- SFT ---------------------------------------------------------------------------------------

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy 2-core machine two
    OpenMP threads per op slowed these tests down several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sft_config_validation():
    SFTConfig()  # defaults are valid
    with pytest.raises(ValueError, match=r"learning_rate: expected a finite float > 0, got -0\.001"):
        SFTConfig(learning_rate=-1e-3)
    with pytest.raises(ValueError, match=r"batch_size: expected an int >= 1, got 0"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"warmup_ratio: expected a float in \[0, 1\), got 1\.0"):
        SFTConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError, match="max_steps: expected None or an int >= 1, got 0"):
        SFTConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_length: expected"):
        SFTConfig(max_length=1)
    with pytest.raises(ValueError, match="micro_batch_size: expected None or an int in"):
        SFTConfig(batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="pad_to_multiple_of: expected an int >= 1, got 0"):
        SFTConfig(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="bf16_autocast: expected a bool"):
        SFTConfig(bf16_autocast="yes")
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got True"):
        SFTConfig(batch_size=True)


def test_tokenization_matches_env_convention(tok, examples):
    items = tokenize_sft_examples(tok, examples[:5])
    for (prompt, response), it in zip(examples[:5], items):
        p = tok(prompt).input_ids
        r = tok(response, add_special_tokens=False).input_ids
        assert it.ids == p + r + [tok.eos_token_id]
        assert it.n_prompt == len(p) and it.ids[0] == tok.bos_token_id
    with pytest.raises(ValueError, match=r"examples\[1\]: expected a \(prompt: str, response: str\)"):
        tokenize_sft_examples(tok, [("a", "b"), ("only prompt",)])


def test_loss_mask_covers_response_and_eos_only(tok, examples):
    items = tokenize_sft_examples(tok, examples[:3])
    batch = sft_examples_to_batches(items, [0, 1, 2], tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row, it in enumerate(items):
        n, k = len(it.ids), it.n_prompt
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        expected = [IGNORE_INDEX] * k + it.ids[k:] + [IGNORE_INDEX] * (width - n)
        assert batch["labels"][row].tolist() == expected
        assert batch["labels"][row, n - 1] == tok.eos_token_id
    padded = sft_examples_to_batches(items, [0, 1, 2], tok.pad_token_id, pad_to_multiple_of=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= width
    assert torch.equal(padded["labels"][:, :width], batch["labels"])
    assert (padded["labels"][:, width:] == IGNORE_INDEX).all()

    # Gradient of the loss w.r.t. the logits is zero exactly where the next token is a prompt
    # token or padding: prompt tokens cannot change the loss, whatever their labels would be.
    logits = torch.randn(3, width, len(tok), requires_grad=True)
    per_instance, n_tokens = sft_loss(logits, batch["labels"])
    per_instance.mean().backward()
    touched = logits.grad.abs().sum(-1) > 0
    for row, it in enumerate(items):
        n, k = len(it.ids), it.n_prompt
        assert n_tokens[row] == n - k
        assert touched[row].tolist() == [False] * (k - 1) + [True] * (n - k) + [False] * (width - n + 1)

    # changing the prompt's token ids in the labels (they are ignored) leaves the loss unchanged
    labels = batch["labels"].clone()
    for row, it in enumerate(items):
        labels[row, : it.n_prompt] = IGNORE_INDEX
    assert torch.equal(sft_loss(logits, labels)[0], per_instance)


def test_loss_is_per_instance_mean():
    vocab = 5
    logits = torch.randn(2, 5, vocab)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3],
                           [IGNORE_INDEX, 1, 2, 4, IGNORE_INDEX]])
    per_instance, n = sft_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    a = -logp[0, 3, 3]
    b = -(logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 4]) / 3
    assert torch.allclose(per_instance, torch.stack([a, b]))
    assert n.tolist() == [1, 3]


def test_sft_decreases_loss(tok, examples, one_thread):
    cfg = SFTConfig(learning_rate=1e-2, batch_size=4, max_steps=30, warmup_ratio=0.1,
                    bf16_autocast=False, seed=3)
    torch.manual_seed(0)
    model = build_tiny_model(tok, **SMALL)
    metrics = train_sft(model, tok, examples[:8], cfg, progress=False)
    assert len(metrics) == 30
    keys = {"step", "loss", "lr", "tokens", "tokens_total", "grad_norm", "epoch", "seconds"}
    assert keys <= metrics[0].keys()
    first = metrics[0]["loss"]
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert metrics[0]["lr"] < metrics[2]["lr"]  # warm-up
    assert metrics[-1]["lr"] < metrics[10]["lr"]  # decay
    assert metrics[-1]["epoch"] == pytest.approx(15.0)  # 30 steps of 4 over 8 examples
    assert not model.training


def test_sft_is_deterministic(tok, examples, one_thread):
    cfg = SFTConfig(learning_rate=1e-2, batch_size=2, max_steps=5, bf16_autocast=False, seed=1)

    def run():
        torch.manual_seed(0)
        model = build_tiny_model(tok, **SMALL)
        losses = [m["loss"] for m in train_sft(model, tok, examples[:6], cfg, progress=False)]
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2 and torch.equal(p1, p2)


def test_micro_batches_give_the_same_step(tok, examples, one_thread):
    data = examples[:4]
    losses, params = [], []
    for micro in (None, 1):
        torch.manual_seed(0)
        model = build_tiny_model(tok, **SMALL)
        cfg = SFTConfig(batch_size=4, max_steps=2, micro_batch_size=micro, bf16_autocast=False)
        losses.append([m["loss"] for m in train_sft(model, tok, data, cfg, progress=False)])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_sft_skips_too_long_and_rejects_all_too_long(tok, examples, one_thread):
    cfg = SFTConfig(max_steps=1, batch_size=2, max_length=8, bf16_autocast=False)
    model = build_tiny_model(tok, **SMALL)
    with pytest.raises(ValueError, match="max_length=8"):
        train_sft(model, tok, examples[:2], cfg, progress=False)
    metrics = train_sft(model, tok, examples[:2] + [("Q:", " 4")], cfg, progress=False)
    assert metrics[0]["tokens"] == 3  # " ", "4", EOS of the one short example


# --- warm start --------------------------------------------------------------------------------


def test_warm_start_caches_and_loads(examples, tmp_path, monkeypatch, one_thread):
    data = examples[:6]
    texts = _texts(examples[:50])
    cfg = SFTConfig(batch_size=2, max_steps=3, bf16_autocast=False)
    model_overrides = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    kwargs = dict(cache_dir=tmp_path, model_overrides=model_overrides, sft_config=cfg,
                  progress=False, vocab_size=300)

    path = warm_start("tiny-test", data, texts, **kwargs)
    assert path.parent == tmp_path and path.name.startswith("tiny-test-")
    assert (path / WARM_START_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    marker = json.loads((path / WARM_START_MARKER).read_text())
    assert marker["steps"] == 3

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32
    assert tok(data[0][0]).input_ids[0] == tok.bos_token_id
    out = model.generate(**tok([data[0][0]], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 1

    # second call: same path, no training
    def boom(*a, **k):
        raise AssertionError("train_sft must not run on a cache hit")

    monkeypatch.setattr(warm_start_module, "train_sft", boom)
    assert warm_start("tiny-test", data, texts, **kwargs) == path

    # any change of inputs -> another directory (here: would train, and fail loudly, leaving nothing)
    with pytest.raises(AssertionError, match="must not run"):
        warm_start("tiny-test", data[:5], texts, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_warm_start_replaces_incomplete_directory(examples, tmp_path, one_thread):
    data = examples[:4]
    texts = _texts(examples[:30])
    cfg = SFTConfig(batch_size=2, max_steps=1, bf16_autocast=False)
    overrides = {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "intermediate_size": 32}
    kwargs = dict(cache_dir=tmp_path, model_overrides=overrides, sft_config=cfg, progress=False,
                  vocab_size=300)
    path = warm_start("half", data, texts, **kwargs)
    (path / WARM_START_MARKER).unlink()  # as if someone left a half-written directory there
    (path / "model.safetensors").write_bytes(b"garbage")
    again = warm_start("half", data, texts, **kwargs)
    assert again == path and (path / WARM_START_MARKER).is_file()
    AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="name: expected"):
        warm_start("../evil", data, texts, **kwargs)
