"""The offline default model ``tiny``: a byte-level BPE tokenizer trained on the task's own text and a
small Llama-architecture causal LM built from a config (no download, no hub).

`build_tokenizer` trains the tokenizer (`build_char_tokenizer` is the character-level alternative,
for tasks with a small alphabet such as ``arithmetic``), `tiny_config` describes the model and `build_tiny_model`
instantiates it with random weights; `algos.models.warm_start.warm_start` then fine-tunes it on the task's
reference solutions and caches the result in Hugging Face format, so everything downstream loads it
with ``AutoTokenizer`` / ``AutoModelForCausalLM`` exactly like a hub checkpoint.

Tokenizer design (see DESIGN.md §5):

- byte-level BPE: the 256 byte symbols are always in the vocabulary, so every string (any unicode)
  encodes without ``<unk>`` and ``decode(encode(s, add_special_tokens=False)) == s`` exactly
  (no normaliser, no prefix space, no clean-up of spaces on decode);
- every digit is its own token (``Digits(individual_digits=True)`` before the byte-level split, as
  Llama and DeepSeekMath do), so numbers are spelt digit by digit;
- special tokens ``<unk>`` (id 0), ``<s>`` (BOS, 1), ``</s>`` (EOS, 2), ``<pad>`` (3);
- encoding a text prepends BOS (the post-processor) but never appends EOS: a prompt is ``<s>`` +
  text, and the policy itself ends a response with ``</s>``, as in VinePPO's prompt format
  (reference/vineppo_reference.md §6);
- left padding (for batched generation).
"""

from __future__ import annotations

from typing import Any, Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

#: Special tokens, in id order (Llama's order for the first three).
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

#: Default BPE vocabulary size (tokens, special and byte tokens included).
DEFAULT_VOCAB_SIZE = 2048


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Training is deterministic: the same texts in the same order give the same vocabulary and merges.

    Args:
        texts: the training corpus (e.g. the task's problems and reference solutions). Consumed once.
        vocab_size: target vocabulary size in tokens, special tokens and the 256 byte symbols
            included; it must exceed ``256 + len(SPECIAL_TOKENS)``. The result can be smaller when the
            corpus has too few distinct pairs to merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos/pad/unk set, ``padding_side="left"``; calling it
        on a text returns ``<s>`` followed by the text's tokens (no EOS). Save it with
        ``save_pretrained(dir)`` and reload with ``AutoTokenizer.from_pretrained(dir)``.

    Raises:
        ValueError: if ``vocab_size`` is too small, or ``texts`` is not an iterable of strings or
            holds no text at all.
    """
    min_size = 256 + len(SPECIAL_TOKENS) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size: expected an int >= {min_size}, got {vocab_size!r}")
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts: expected an iterable of strings, got a single string")
    corpus = list(texts)
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}]: expected str, got {type(text).__name__}")
    if not any(corpus):
        raise ValueError("texts: expected at least one non-empty string, got none")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos_id = tok.token_to_id(BOS_TOKEN)
    # ByteLevel(trim_offsets=False) keeps character offsets exact (a leading space stays inside the
    # token's span); the template then prepends BOS (offsets (0, 0)).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def build_char_tokenizer(texts: Iterable[str]) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of the corpus alphabet.

    Same conventions as `build_tokenizer`: special tokens ``<unk>`` (id 0), ``<s>`` (BOS, 1),
    ``</s>`` (EOS, 2), ``<pad>`` (3); encoding prepends BOS (the post-processor) and never appends
    EOS; left padding; no normaliser and no clean-up of spaces, so
    ``decode(encode(s, add_special_tokens=False)) == s`` exactly for every ``s`` written in the
    alphabet seen in ``texts``. The characters (unicode code points) get ids 4, 5, ... in sorted
    order, so the same alphabet always gives the same vocabulary, whatever the order of ``texts``.

    Characters outside the alphabet encode to ``<unk>`` (one per character) and so do not
    round-trip: ``decode`` drops ``<unk>`` with ``skip_special_tokens=True`` and writes ``"<unk>"``
    otherwise. Build it from the task's full text (prompts and targets) so that this never happens
    for the task's own prompts; a model can only ever generate alphabet characters.

    Implementation: a ``WordLevel`` model over a pre-tokenizer that isolates every character
    (``Split("", "isolated")``) and a ``Fuse`` decoder; character offsets are exact. Save it with
    ``save_pretrained(dir)`` and reload with ``AutoTokenizer.from_pretrained(dir)``.

    Args:
        texts: the corpus whose characters make the alphabet. Consumed once.

    Raises:
        ValueError: if ``texts`` is not an iterable of strings or holds no text at all.
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts: expected an iterable of strings, got a single string")
    alphabet: set[str] = set()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}]: expected str, got {type(text).__name__}")
        alphabet.update(text)
    if not alphabet:
        raise ValueError("texts: expected at least one non-empty string, got none")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        if ch not in vocab:  # no special token is a single character; guard anyway
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def tiny_config(
    tokenizer: transformers.PreTrainedTokenizerBase,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    intermediate_size: int | None = None,
    **overrides: Any,
) -> transformers.LlamaConfig:
    """A small Llama config sized to ``tokenizer``.

    With the defaults (hidden 256, 4 layers, 4 heads, MLP 4 x hidden, vocab 2048, tied
    input/output embeddings) the model has about 4.7M parameters, 0.5M of them in the embedding.

    Args:
        tokenizer: gives the vocabulary size and the bos/eos/pad ids.
        hidden_size: model width; must be divisible by ``num_heads``.
        num_layers: number of decoder layers.
        num_heads: attention heads (and key/value heads: plain multi-head attention).
        max_position_embeddings: longest sequence in tokens (prompt + response).
        intermediate_size: width of the SwiGLU MLP; ``None`` means ``4 * hidden_size``.
        **overrides: any other ``LlamaConfig`` field (e.g. ``rope_theta``).

    Raises:
        ValueError: on a non-positive size or ``hidden_size`` not divisible by ``num_heads``.
    """
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size: expected a multiple of num_heads={num_heads}, got {hidden_size}"
        )
    if intermediate_size is None:
        intermediate_size = 4 * hidden_size
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def build_tiny_model(
    tokenizer: transformers.PreTrainedTokenizerBase, **config_overrides: Any
) -> transformers.LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` from ``tiny_config(tokenizer, **config_overrides)``.

    Initialisation draws from torch's global RNG: call ``torch.manual_seed`` first for a
    reproducible model. The model is float32, on CPU, in train mode.
    """
    config = tiny_config(tokenizer, **config_overrides)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.train()
    return model


def count_parameters(model: Any) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
