"""The synthetic arithmetic task (langenv/tasks/arithmetic.py), the character tokenizer
(algos/models/tiny.py) and the per-task tiny warm-start setup (algos/models/sft.py)."""

from __future__ import annotations

import json
import re

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForCausalLM, AutoTokenizer

import langenv
from algos.models.sft import SFTConfig
from algos.models.tiny import DEFAULT_VOCAB_SIZE, build_char_tokenizer, build_tiny_model
from algos.models.warm_start import (TINY_ARITHMETIC_MODEL, TINY_ARITHMETIC_SFT, TINY_GSM8K_MODEL, TINY_GSM8K_SFT,
                                     WARM_START_MARKER, TinySetup, tiny_setup, warm_start, warm_start_key)
from langenv import grading
from langenv.tasks import ArithmeticTask, make_task
from langenv.tasks import arithmetic as arith
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP

SMALL = dict(train_size=300, validation_size=60, test_size=120)
LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
WORD_OP = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}


def _parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    m = re.fullmatch(r"Start with (\d+)\. (.*)\. What is the result\?", question)
    assert m, question
    chain = []
    for phrase in re.split(r", (?:then )?", m.group(2)):
        words, num = phrase.lower().rsplit(" ", 1)
        chain.append((WORD_OP[words], int(num)))
    return int(m.group(1)), chain


def _check_problem(task: ArithmeticTask, p) -> None:
    """Recompute every line of the gold solution and check it against the question and the knobs."""
    *lines, last = p.solution.split("\n")
    start, chain = _parse_question(p.question)
    n_ops = int(dict(p.meta)["num_ops"])
    assert len(lines) == len(chain) == n_ops
    assert task.min_ops <= n_ops <= task.max_ops
    assert task.min_operand <= start <= task.max_operand
    value = start
    for line, (op, b) in zip(lines, chain):
        a, sym, b2, c = LINE.fullmatch(line).groups()
        assert (int(a), sym, int(b2)) == (value, op, b)
        assert op in task.operators
        assert task.min_operand <= b <= task.max_operand
        expected = {"+": value + b, "-": value - b, "*": value * b}.get(op)
        if op == "/":
            assert b != 0 and value % b == 0
            expected = value // b
        assert int(c) == expected >= 0
        value = expected
    assert last == f"#### {value}" and p.answer == str(value)


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(**SMALL)


@pytest.fixture(scope="module")
def char_tok(task):
    texts = [t for p in task.load("train") for t in (task.prompt(p), task.target(p))]
    return build_char_tokenizer(texts)


# ------------------------------------------------------------------------------ the problems


def test_hand_computed_problem():
    q, sol, ans = arith.format_problem(7, [("+", 5), ("*", 3), ("-", 4)])
    assert q == "Start with 7. Add 5, multiply by 3, then subtract 4. What is the result?"
    assert sol == "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\n#### 32" and ans == 32
    q, sol, ans = arith.format_problem(8, [("/", 2), ("-", 4)])
    assert q == "Start with 8. Divide by 2, then subtract 4. What is the result?"
    assert sol == "8 / 2 = 4\n4 - 4 = 0\n#### 0" and ans == 0
    assert arith.format_problem(3, [("*", 9)])[:2] == ("Start with 3. Multiply by 9. What is the result?",
                                                        "3 * 9 = 27\n#### 27")
    with pytest.raises(ValueError, match="exact"):
        arith.apply_op(7, "/", 2)


def test_task_protocol_and_format(task):
    assert isinstance(task, langenv.Task)
    assert (task.name, task.grading_kind, task.stop_strings) == ("arithmetic", "gsm8k_strict", VINEPPO_STOP)
    p = task.load("test")[0]
    assert task.prompt(p) == VINEPPO_PROMPT.format(problem=p.question)
    assert task.target(p) == "\n" + p.solution


def test_splits_sizes_ids_meta_and_disjointness(task):
    splits = {s: task.load(s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 300, "validation": 60, "test": 120}
    for s, probs in splits.items():
        assert [p.id for p in probs] == [f"arithmetic/{s}/{i}" for i in range(len(probs))]
        assert all(p.meta == (("num_ops", str(len(p.solution.split("\n")) - 1)),) for p in probs)
    q = {s: {p.question for p in v} for s, v in splits.items()}
    assert len(q["test"]) == 120 and len(q["validation"]) == 60  # distinct within held-out splits
    assert not q["train"] & q["test"] and not q["train"] & q["validation"]
    assert not q["validation"] & q["test"]


def test_default_splits_and_uniform_mix():
    t = make_task("arithmetic")
    sizes = {s: len(t.load(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 20000, "validation": 500, "test": 2000}
    test_q = {p.question for p in t.load("test")}
    assert not test_q & {p.question for p in t.load("train")}
    counts = [sum(p.meta == (("num_ops", str(k)),) for p in t.load("test")) for k in (2, 3, 4)]
    assert all(600 <= c <= 740 for c in counts), counts  # ~2000/3 each


def test_splits_are_deterministic_and_seeded(task):
    fresh = arith._splits.__wrapped__(task.knobs)  # regenerate, bypassing the cache
    for s in ("train", "validation", "test"):
        assert fresh[s] == task.load(s)
    assert ArithmeticTask(**SMALL).load("test") is task.load("test")  # cached per knobs
    other = ArithmeticTask(seed=1, **SMALL)
    assert [p.question for p in other.load("test")] != [p.question for p in task.load("test")]
    # the test split does not depend on the train size
    assert ArithmeticTask(**{**SMALL, "train_size": 50}).load("test") == task.load("test")


def test_every_gold_solution_is_right_and_grades_correct(task):
    for s in ("train", "test"):
        for p in task.load(s):
            _check_problem(task, p)
    for p in task.load("test")[:40]:
        assert grading.grade(task.target(p), p.answer, "gsm8k").status == "correct"
        wrong = task.target(p).rsplit("#### ", 1)[0] + f"#### {int(p.answer) + 1}"
        assert grading.grade(wrong, p.answer, "gsm8k").status == "incorrect"


@pytest.mark.parametrize("knobs", [
    dict(min_ops=1, max_ops=1, min_operand=0, max_operand=3, operators="+*"),
    dict(min_ops=3, max_ops=5, min_operand=2, max_operand=20, operators="/*-"),
    dict(min_ops=2, max_ops=2, min_operand=1, max_operand=9, operators="-"),
    dict(min_ops=2, max_ops=3, min_operand=1, max_operand=12, operators="+-*/", seed=7),
])
def test_knobs_are_respected(knobs):
    t = ArithmeticTask(train_size=200, validation_size=10, test_size=20, **knobs)
    assert t.operators == "".join(c for c in "+-*/" if c in knobs["operators"])
    probs = t.load("train") + t.load("test")
    for p in probs:
        _check_problem(t, p)
    seen_ops = {int(dict(p.meta)["num_ops"]) for p in probs}
    assert seen_ops == set(range(knobs["min_ops"], knobs["max_ops"] + 1))
    used = {line.split(" ")[1] for p in probs for line in p.solution.split("\n")[:-1]}
    assert used == set(knobs["operators"])


def test_split_steps_one_per_operation(task):
    for p in task.load("test")[:50]:
        target = task.target(p)
        steps = task.split_steps(target)
        assert "".join(steps) == target
        assert len(steps) == int(dict(p.meta)["num_ops"])
        assert steps[-1].endswith("#### " + p.answer) and all("####" not in s for s in steps[:-1])
    assert task.split_steps("\n1 + 2 = 3\n3 * 4 = 12\n#### 12") == ["\n1 + 2 = 3\n", "3 * 4 = 12\n#### 12"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(min_ops=0), "min_ops"),
    (dict(min_ops=3, max_ops=2), "max_ops"),
    (dict(max_ops=2.5), "max_ops"),
    (dict(min_operand=-1), "min_operand"),
    (dict(min_operand=5, max_operand=4), "max_operand"),
    (dict(operators=""), "operators"),
    (dict(operators="+x"), "operators"),
    (dict(operators="++"), "operators"),
    (dict(operators=3), "operators"),
    (dict(seed=-1), "seed"),
    (dict(seed=True), "seed"),
    (dict(train_size=0), "train_size"),
    (dict(validation_size="5"), "validation_size"),
    (dict(test_size=None), "test_size"),
])
def test_bad_knobs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ArithmeticTask(**kwargs)


def test_unknown_split_and_too_small_space(task):
    with pytest.raises(ValueError, match="'train', 'validation', 'test'.*'dev'"):
        task.load("dev")
    # 1 op, operands 1-2, "+": only 4 distinct questions exist
    tiny = ArithmeticTask(min_ops=1, max_ops=1, max_operand=2, operators="+",
                          train_size=5, validation_size=1, test_size=10)
    with pytest.raises(ValueError, match="test_size: .*too few distinct questions"):
        tiny.load("test")
    # every question held out: train cannot be filled
    full = ArithmeticTask(min_ops=1, max_ops=1, max_operand=2, operators="+",
                          train_size=5, validation_size=1, test_size=3)
    with pytest.raises(ValueError, match="train_size: "):
        full.load("train")
    stuck = ArithmeticTask(min_ops=3, max_ops=3, min_operand=2, max_operand=3, operators="/",
                           train_size=1, validation_size=1, test_size=1)
    with pytest.raises(ValueError, match="operators: no chain of 3 operations"):
        stuck.load("test")


# ------------------------------------------------------------------------ registry and env


def test_make_task_and_gym_env_with_char_tokenizer(task, char_tok):
    t = make_task("arithmetic", max_ops=3, **SMALL)
    assert isinstance(t, ArithmeticTask) and t.max_ops == 3
    assert "arithmetic" in langenv.task_names()

    env = gym.make("langenv/Arithmetic-v1", tokenizer=char_tok, max_new_tokens=100)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    base = env.unwrapped
    p = next(q for q in base.problems if q.id == info["problem_id"])
    assert char_tok.decode(obs.tolist(), skip_special_tokens=True) == make_task("arithmetic").prompt(p)
    gold = char_tok(base.task.target(p), add_special_tokens=False).input_ids + [char_tok.eos_token_id]
    _, reward, terminated, truncated, info = env.step(gold)
    assert (reward, terminated, truncated, info["status"]) == (1.0, True, False, "correct")

    env2 = langenv.LanguageEnv(task, char_tok, split="test", max_new_tokens=100)
    s = env2.initial_state(task.load("test")[0])
    wrong = char_tok("\n1 + 1 = 2\n#### -1", add_special_tokens=False).input_ids + [char_tok.eos_token_id]
    r = env2.step_states([s], [wrong])[0]
    assert (r.reward, r.status) == (0.0, "incorrect")


# ------------------------------------------------------------------------ char tokenizer


def test_char_tokenizer_round_trip_and_special_ids(char_tok, tmp_path):
    tok = char_tok
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = sorted(set("".join(tok.convert_ids_to_tokens(list(range(4, len(tok)))))))
    assert tok.convert_ids_to_tokens(list(range(4, len(tok)))) == alphabet  # one char each, sorted
    assert "\n" in alphabet and " " in alphabet and set("0123456789#=+-*") <= set(alphabet)
    text = "\n12 * 3 = 36\n\n  36 - 4 = 32\n#### 32"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok(text).input_ids == [1] + ids  # BOS prepended, never EOS
    assert tok(text, return_offsets_mapping=True).offset_mapping[1:] == [(i, i + 1) for i in range(len(text))]
    # outside the alphabet: <unk>, dropped on decode with skip_special_tokens
    unk = tok("1é2", add_special_tokens=False).input_ids
    assert unk[1] == 0 and tok.decode(unk, skip_special_tokens=True) == "12"
    batch = tok(["1", "123"], padding=True)
    assert batch.input_ids[0][:2] == [3, 3] and batch.attention_mask[0] == [0, 0, 1, 1]  # left padding
    # deterministic vocabulary, whatever the order of the texts
    texts = ["b a\n", "1+2", "#"]
    assert build_char_tokenizer(texts).get_vocab() == build_char_tokenizer(texts[::-1]).get_vocab()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == tok(text).input_ids and again.decode(ids) == text
    assert (again.padding_side, again.bos_token_id, again.eos_token_id, again.pad_token_id) == ("left", 1, 2, 3)
    with pytest.raises(ValueError, match="texts"):
        build_char_tokenizer("abc")
    with pytest.raises(ValueError, match="texts"):
        build_char_tokenizer(["", ""])


# ------------------------------------------------------------------------ warm start


def test_tiny_setup():
    a = tiny_setup("arithmetic")
    assert isinstance(a, TinySetup)
    assert (a.tokenizer, a.vocab_size, a.model_overrides, a.sft_config) == (
        "char", None, TINY_ARITHMETIC_MODEL, TINY_ARITHMETIC_SFT)
    assert TINY_ARITHMETIC_MODEL == {"hidden_size": 256, "num_layers": 4, "num_heads": 4}
    assert (TINY_ARITHMETIC_SFT.batch_size, TINY_ARITHMETIC_SFT.max_steps) == (64, 800)
    for name in ("gsm8k", "math", "anything"):
        g = tiny_setup(name)
        assert (g.tokenizer, g.vocab_size, g.model_overrides, g.sft_config) == (
            "bpe", DEFAULT_VOCAB_SIZE, TINY_GSM8K_MODEL, TINY_GSM8K_SFT)
    a.model_overrides["hidden_size"] = 1  # a copy: the module constant is untouched
    assert TINY_ARITHMETIC_MODEL["hidden_size"] == 256


def test_warm_start_key_keeps_bpe_keys_and_marks_char():
    cfg = SFTConfig(max_steps=1, bf16_autocast=False)
    ex = [("p", "r")]
    bpe = warm_start_key("n", ex, ["p", "r"], {}, cfg)
    assert "tokenizer" not in bpe and bpe["vocab_size"] == DEFAULT_VOCAB_SIZE
    char = warm_start_key("n", ex, ["p", "r"], {}, cfg, None, "char")
    assert char["tokenizer"] == "char" and char["vocab_size"] is None
    assert warm_start_key("n", ex, ["p", "r"], {}, cfg, 999, "char") == char  # vocab_size ignored


def test_warm_start_with_char_tokenizer(task, tmp_path):
    probs = task.load("train")[:12]
    examples = [(task.prompt(p), task.target(p)) for p in probs]
    texts = [t for pair in examples for t in pair]
    cfg = SFTConfig(learning_rate=1e-3, batch_size=4, max_steps=2, max_length=256, bf16_autocast=False)
    overrides = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 256}
    path = warm_start("tiny-arith-test", examples, texts, tmp_path, overrides, cfg,
                      progress=False, tokenizer="char")
    marker = json.loads((path / WARM_START_MARKER).read_text())
    assert marker["steps"] == 2 and marker["key"]["tokenizer"] == "char"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == len(set("".join(texts))) + 4 == model.config.vocab_size
    assert tok.decode(tok(examples[0][1], add_special_tokens=False).input_ids) == examples[0][1]
    with torch.no_grad():
        logits = model(torch.tensor([tok(examples[0][0]).input_ids])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    # a second call reuses the cache; a BPE call with the same inputs is a different entry
    assert warm_start("tiny-arith-test", examples, texts, tmp_path, overrides, cfg,
                      progress=False, tokenizer="char", vocab_size=123) == path
    with pytest.raises(ValueError, match="tokenizer: expected one of 'bpe', 'char'"):
        warm_start("x", examples, texts, tmp_path, overrides, cfg, tokenizer="word")


def test_build_tiny_model_on_char_tokenizer(char_tok):
    torch.manual_seed(0)
    model = build_tiny_model(char_tok, hidden_size=32, num_layers=1, num_heads=2)
    assert model.config.vocab_size == len(char_tok) < 64
