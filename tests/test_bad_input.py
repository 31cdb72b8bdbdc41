"""Bad input: every case raises a clear error naming the file:line, field or value (and the valid
names where there is a list), and nothing already written is changed.

Groups: data files (`langenv.data.load_split`), tasks and the environment, algorithm configs
(`algos.training.checks`), models and tokenizers (`algos.models.policy`), the command line
(`experiments.run.main`, tyro usage errors) and the trainer (`algos.training.loop.train`: run directory,
prompt length).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from algos.config import with_fields
from algos.dpo_plus import DPOPlusConfig
from algos.grpo import GRPO, GRPOConfig
from algos.ppo import PPOConfig
from algos.restem import RestEMConfig
from algos.rloo import RLOOConfig
from algos.sft_control import SFTControlConfig
from algos.vineppo import VinePPOConfig
from experiments.presets import ALGORITHMS
from langenv.data import load_split

NAN, INF = float("nan"), float("inf")


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show that nothing was touched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flat(text: str) -> str:
    """tyro's boxed, wrapped error output as one line of words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"})


# ============================================================================ data files

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, GOOD, '{"question": "q", "answer": ')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: malformed JSON line"):
        load_split("gsm8k", "test", source=str(path))


def test_non_object_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, '["a", "list"]')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: expected a JSON object, got list"):
        load_split("gsm8k", "test", source=str(path))


def test_missing_field_in_every_row_names_the_field_and_lists_columns(tmp_path):
    path = write_lines(tmp_path / "noanswer.jsonl", json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: missing required field 'answer' \(columns: question\)"):
        load_split("gsm8k", "test", source=str(path))


def test_missing_field_in_one_row_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "hole.jsonl", GOOD, "", GOOD, json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:4: missing required field 'answer'"):
        load_split("gsm8k", "test", source=str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"], ids=["empty-file", "blank-lines", "empty-array"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: empty dataset"):
        load_split("gsm8k", "test", source=str(path))


def test_gz_file_that_is_not_gzip(tmp_path):
    path = write_lines(tmp_path / "test.jsonl.gz", GOOD)  # plain text behind a .gz name
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a valid gzip file"):
        load_split("gsm8k", "test", source=str(path))


def test_truncated_gzip_file(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    path.write_bytes(gzip.compress(((GOOD + "\n") * 50).encode())[:40])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a valid gzip file"):
        load_split("gsm8k", "test", source=str(path))


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9"):
        load_split("gsm8k", "test", source=str(path))


@pytest.mark.parametrize("value, kind", [(12, "int"), (["a", "b"], "list"), ({"text": "q"}, "dict")],
                         ids=["int", "list", "object"])
def test_wrong_field_type_names_file_line_field_and_value(tmp_path, value, kind):
    # `datasets` would silently turn these into strings such as '"a"' or '12'
    path = write_lines(tmp_path / "types.jsonl", GOOD, json.dumps({"question": value, "answer": "#### 1"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: field 'question': expected a string, got {kind}"):
        load_split("gsm8k", "test", source=str(path))


def test_gsm8k_answer_without_final_answer_line(tmp_path):
    from langenv.tasks import make_task

    path = write_lines(tmp_path / "nohash.jsonl", GOOD, json.dumps({"question": "q", "answer": "it is 5"}))
    with pytest.raises(ValueError, match=rf"^gsm8k source '{re.escape(str(path))}', split 'test', row 1 \(0-based\): "
                                         r"field 'answer': expected a GSM8K solution ending in '#### <final answer>', "
                                         r"got 'it is 5'"):
        make_task("gsm8k", source=str(path)).load("test")


def test_empty_question_string_is_a_missing_field(tmp_path):
    path = write_lines(tmp_path / "blankq.jsonl", GOOD, json.dumps({"question": "  ", "answer": "#### 1"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: missing required field 'question' \(empty string\)"):
        load_split("gsm8k", "test", source=str(path))


def test_duplicate_math_unique_id_names_both_lines(tmp_path):
    row = {"problem": "p", "solution": r"so \boxed{1}", "unique_id": "test/algebra/1.json"}
    path = write_lines(tmp_path / "dup.jsonl", json.dumps(row), json.dumps({**row, "problem": "other"}))
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{where}:2: field 'unique_id': 'test/algebra/1.json' already used by {where}:1"):
        load_split("math", "test", source=str(path))


def test_data_file_not_found_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "test.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"data file not found: {re.escape(str(missing))}"):
        load_split("gsm8k", "test", source=str(missing))


def test_directory_without_the_split_lists_the_files_tried(tmp_path):
    write_lines(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(FileNotFoundError, match=r"no file for split 'test' in directory .*test\.jsonl\.gz, test\.jsonl"):
        load_split("gsm8k", "test", source=str(tmp_path))


@pytest.mark.parametrize("dataset, split, message", [
    ("svamp", "test", r"unknown dataset 'svamp'; valid datasets: gsm8k, math"),
    ("gsm8k", "dev", r"unknown split 'dev'; valid splits: train, train_full, validation, test"),
], ids=["dataset", "split"])
def test_unknown_dataset_or_split_lists_valid_names(dataset, split, message):
    with pytest.raises(ValueError, match=message):
        load_split(dataset, split)


def test_failed_load_writes_nothing_and_is_not_cached(tmp_path, monkeypatch):
    import datasets

    path = write_lines(tmp_path / "test.jsonl", GOOD, "{oops")
    before = tree(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not run on a file that failed the checks")

    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", never)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: malformed JSON line"):
            load_split("gsm8k", "test", source=str(path))
    assert tree(tmp_path) == before  # nothing written next to the data, nothing converted by `datasets`
    write_lines(path, GOOD, GOOD)  # fixed: loads (the failure was not cached)
    assert len(load_split("gsm8k", "test", source=str(path))) == 2


# ============================================================================ tasks and environment

def test_unknown_task_lists_registered_names(tokenizer):
    from langenv.env import LanguageEnv
    from langenv.tasks import make_task

    for build in (lambda: make_task("gsm9k"), lambda: LanguageEnv("gsm9k", tokenizer)):
        with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; registered tasks: ") as info:
            build()
        assert all(name in str(info.value) for name in ("arithmetic", "gsm8k", "math"))


@pytest.mark.parametrize("task, message", [
    ("gsm8k", r"unknown split 'dev'; valid splits: train, train_full, validation, test"),
    ("arithmetic", r"split: expected one of 'train', 'validation', 'test', got 'dev'"),
], ids=["gsm8k", "arithmetic"])
def test_task_split_that_does_not_exist_lists_valid_splits(tokenizer, task, message):
    from langenv.env import LanguageEnv

    with pytest.raises(ValueError, match=message):
        LanguageEnv(task, tokenizer, split="dev")


def test_arithmetic_knob_out_of_range_names_the_argument():
    from langenv.tasks import make_task

    with pytest.raises(ValueError, match=r"min_ops: expected an int >= 1, got 0"):
        make_task("arithmetic", min_ops=0)


def test_env_tokenizer_without_eos(tokenizer):
    from langenv.env import LanguageEnv

    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=r"has no EOS token"):
        LanguageEnv("gsm8k", no_eos, split="test")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, r"max_new_tokens: expected an int >= 1, got 0"),
    ({"max_context": 1}, r"max_context: expected None or an int >= 2 .*got 1"),
    ({"max_context": 512.0}, r"max_context: expected None or an int >= 2 .*got 512\.0"),
], ids=["max_new_tokens-0", "max_context-1", "max_context-float"])
def test_env_budget_settings(tokenizer, kwargs, message):
    from langenv.env import LanguageEnv

    with pytest.raises(ValueError, match=message):
        LanguageEnv("gsm8k", tokenizer, split="test", **kwargs)


def test_prompt_longer_than_context_names_problem_length_and_limit(tokenizer):
    from langenv.env import LanguageEnv

    env = LanguageEnv("gsm8k", tokenizer, split="test", max_context=16)
    n = len(env.prompt_ids(env.problems[0]))
    expected = rf"problem gsm8k/test/0: prompt is {n} tokens, .*context of 16 tokens \(limit: prompts of at most 15 tokens\)"
    with pytest.raises(ValueError, match=expected):
        env.reset(seed=0, options={"problem_index": 0})
    with pytest.raises(ValueError, match=expected):  # the same check for a whole split, up front
        env.check_prompt_lengths()
    roomy = LanguageEnv("gsm8k", tokenizer, split="test", max_context=4096)
    assert 0 < roomy.check_prompt_lengths(roomy.problems[:20]) < 4096


def test_duplicate_problem_ids_in_a_task(tokenizer):
    from langenv.env import LanguageEnv
    from langenv.tasks.base import Problem
    from langenv.tasks.gsm8k import GSM8KTask

    class Twice(GSM8KTask):
        def load(self, split):
            return [Problem("p/1", "one", "#### 1", "1"), Problem("p/1", "two", "#### 2", "2")]

    with pytest.raises(ValueError, match=r"task 'gsm8k' split 'train': problem id 'p/1' is used twice"):
        LanguageEnv(Twice(), tokenizer)


def test_unknown_paper_preset_lists_valid_pairs():
    from experiments.presets import paper_vineppo

    with pytest.raises(ValueError, match=r"unknown \(model, task\) \('rho2b', 'gsm8k'\); valid: \('rho1b', 'gsm8k'\)"):
        paper_vineppo("rho2b", "gsm8k")


# ============================================================================ algorithm configs

CONFIG_CASES = [
    # (id, config class, overrides, exception, message)
    ("vineppo-negative-lr", VinePPOConfig, {"learning_rate": -1e-6}, ValueError,
     r"VinePPOConfig\.optim.learning_rate: expected a value > 0, got -1e-06"),
    ("vineppo-K-zero", VinePPOConfig, {"mc_rollouts": 0}, ValueError,
     r"VinePPOConfig\.mc_rollouts: expected a value > 0, got 0"),
    ("vineppo-kl-nan", VinePPOConfig, {"kl_coef": NAN}, ValueError,
     r"VinePPOConfig\.actor.kl_coef: expected a finite number, got nan"),
    ("vineppo-micro-over-minibatch", VinePPOConfig, {"minibatch_size": 8, "micro_batch_size": 16}, ValueError,
     r"VinePPOConfig\.optim.micro_batch_size: expected a value <= minibatch_size \(8\), got 16"),
    ("vineppo-value-steps-negative", VinePPOConfig, {"max_step_for_value_estimation": -1}, ValueError,
     r"VinePPOConfig\.max_step_for_value_estimation: expected a value >= 0 or None, got -1"),
    ("vineppo-temperature-zero", VinePPOConfig, {"temperature": 0.0}, ValueError,
     r"VinePPOConfig\.sampling.temperature: expected a value > 0, got 0\.0"),
    ("ppo-clip-eps-zero", PPOConfig, {"clip_eps": 0.0}, ValueError,
     r"PPOConfig\.actor.clip_eps: expected a value > 0, got 0\.0"),
    ("ppo-gamma-above-1", PPOConfig, {"gamma": 1.5}, ValueError,
     r"PPOConfig\.gamma: expected a value in \[0, 1\], got 1\.5"),
    ("ppo-critic-lr-inf", PPOConfig, {"critic_learning_rate": INF}, ValueError,
     r"PPOConfig\.critic_learning_rate: expected a finite number, got inf"),
    ("ppo-micro-over-minibatch", PPOConfig, {"minibatch_size": 4, "micro_batch_size": 8}, ValueError,
     r"PPOConfig\.optim.micro_batch_size: expected a value <= minibatch_size \(4\), got 8"),
    ("grpo-group-size-1", GRPOConfig, {"samples_per_prompt": 1}, ValueError,
     r"GRPOConfig\.sampling.samples_per_prompt: expected a value >= 2 \(group-normalised advantages need a group of at least 2\), got 1"),
    ("grpo-clip-eps-negative", GRPOConfig, {"clip_eps": -0.2}, ValueError,
     r"GRPOConfig\.actor.clip_eps: expected a value > 0, got -0\.2"),
    ("grpo-clip-eps-high-zero", GRPOConfig, {"clip_eps_high": 0.0}, ValueError,
     r"GRPOConfig\.actor.clip_eps_high: expected a value > 0, got 0\.0"),
    ("grpo-unknown-aggregation", GRPOConfig, {"aggregation": "mean"}, ValueError,
     (r"GRPOConfig\.actor.aggregation: expected one of 'token_mean', 'seq_mean_token_mean', 'seq_sum_const', "
      r"'seq_mean_token_sum', got 'mean'")),
    ("rloo-group-size-1", RLOOConfig, {"samples_per_prompt": 1}, ValueError,
     r"RLOOConfig\.sampling.samples_per_prompt: expected a value >= 2 \(the leave-one-out baseline needs k >= 2\), got 1"),
    ("rloo-top-p-zero", RLOOConfig, {"top_p": 0.0}, ValueError,
     r"RLOOConfig\.sampling.top_p: expected a value in \(0, 1\], got 0\.0"),
    ("rloo-warmup-ratio-1", RLOOConfig, {"warmup_ratio": 1.0}, ValueError,
     r"RLOOConfig\.optim.warmup_ratio: expected a value in \[0, 1\), got 1\.0"),
    ("dpo-beta-zero", DPOPlusConfig, {"beta": 0.0}, ValueError,
     r"DPOPlusConfig\.beta: expected a value > 0, got 0\.0"),
    ("dpo-lam-negative", DPOPlusConfig, {"lam": -1.0}, ValueError,
     r"DPOPlusConfig\.lam: expected a value >= 0, got -1\.0"),
    ("dpo-reward-threshold-above-1", DPOPlusConfig, {"reward_threshold": 1.5}, ValueError,
     r"DPOPlusConfig\.reward_threshold: expected a value in \(0, 1\], got 1\.5"),
    ("dpo-refresh-without-policy", DPOPlusConfig, {"refresh_reference": True}, ValueError,
     r"DPOPlusConfig\.refresh_reference: expected False unless sample_from='policy'.*sample_from='reference'"),
    ("dpo-unknown-sample-from", DPOPlusConfig, {"sample_from": "sft"}, ValueError,
     r"DPOPlusConfig\.sample_from: expected one of 'reference', 'policy', got 'sft'"),
    ("restem-reward-threshold-zero", RestEMConfig, {"reward_threshold": 0.0}, ValueError,
     r"RestEMConfig\.reward_threshold: expected a value in \(0, 1\], got 0\.0"),
    ("restem-reward-threshold-nan", RestEMConfig, {"reward_threshold": NAN}, ValueError,
     r"RestEMConfig\.reward_threshold: expected a finite number, got nan"),
    ("restem-max-per-problem-zero", RestEMConfig, {"max_per_problem": 0}, ValueError,
     r"RestEMConfig\.max_per_problem: expected a value >= 1 or None, got 0"),
    ("restem-validation-top-p", RestEMConfig, {"validation_top_p": 1.5}, ValueError,
     r"RestEMConfig\.validation_top_p: expected a value in \(0, 1\], got 1\.5"),
    ("restem-validation-temperature", RestEMConfig, {"validation_temperature": -0.1}, ValueError,
     r"RestEMConfig\.validation_temperature: expected a value >= 0, got -0\.1"),
    ("restem-unknown-early-stop", RestEMConfig, {"early_stop_method": "latest"}, ValueError,
     r"RestEMConfig\.early_stop_method: expected one of 'restem_paper_original', 'choose_best', 'last', got 'latest'"),
    ("restem-micro-over-batch", RestEMConfig, {"minibatch_size": 4, "micro_batch_size": 8}, ValueError,
     r"RestEMConfig\.optim.micro_batch_size: expected a value <= minibatch_size \(4\), got 8"),
    ("sft-unknown-field", SFTControlConfig, {"steps_per_iteration": 4}, TypeError,
     r"SFTControlConfig: unknown field 'steps_per_iteration'; valid: .*minibatch_size.*"),
    ("sft-weight-decay-negative", SFTControlConfig, {"weight_decay": -0.1}, ValueError,
     r"SFTControlConfig\.optim.weight_decay: expected a value >= 0, got -0\.1"),
    # wrong types (e.g. from a hand-written config file)
    ("grpo-samples-string", GRPOConfig, {"samples_per_prompt": "8"}, TypeError,
     r"GRPOConfig\.sampling.samples_per_prompt: expected an int, got '8'"),
    ("ppo-epochs-bool", PPOConfig, {"epochs": True}, TypeError, r"PPOConfig\.optim.epochs: expected an int, got True"),
    ("vineppo-epochs-float", VinePPOConfig, {"epochs": 1.5}, TypeError,
     r"VinePPOConfig\.optim.epochs: expected an int, got 1\.5"),
    ("dpo-beta-string", DPOPlusConfig, {"beta": "0.3"}, TypeError, r"DPOPlusConfig\.beta: expected a number, got '0\.3'"),
    ("vineppo-whiten-string", VinePPOConfig, {"whiten_advantages": "yes"}, TypeError,
     r"VinePPOConfig\.actor.whiten_advantages: expected a bool, got 'yes'"),
]


@pytest.mark.parametrize("cls, overrides, exc, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_invalid_config_value(cls, overrides, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        with_fields(cls(), **overrides)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_config_rejects_a_negative_learning_rate_with_the_same_message(name):
    config = ALGORITHMS[name].config
    with pytest.raises(ValueError, match=rf"^{config.__name__}\.optim\.learning_rate: expected a value > 0, got -0\.001$"):
        with_fields(config(), learning_rate=-1e-3)
    assert config() and config.cpu_tiny()  # the defaults and the CPU settings are valid


# ============================================================================ models and tokenizers

@pytest.fixture
def model_dir(tmp_path, tokenizer, small_model):
    path = tmp_path / "model"
    small_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_model_path_missing_names_the_path(tmp_path):
    from algos.models.policy import load_policy

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=rf"model directory not found: '{re.escape(str(missing))}'"):
        load_policy(str(missing))


def test_model_directory_without_config_json(tmp_path, tokenizer):
    from algos.models.policy import load_policy

    tokenizer.save_pretrained(tmp_path)  # a tokenizer but no model
    with pytest.raises(FileNotFoundError, match=rf"model directory '{re.escape(str(tmp_path))}' has no config\.json"):
        load_policy(str(tmp_path))


def test_bad_dtype_name(model_dir):
    from algos.models.policy import load_policy

    with pytest.raises(ValueError, match=r"dtype: expected 'auto', a torch\.dtype or its name .*got 'float33'"):
        load_policy(str(model_dir), dtype="float33")


def test_saved_tokenizer_without_eos_names_the_model(model_dir, tokenizer):
    from algos.models.policy import load_policy

    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    no_eos.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=rf"tokenizer of '{re.escape(str(model_dir))}' has no EOS token"):
        load_policy(str(model_dir))


def test_saved_tokenizer_without_pad_falls_back_to_eos_with_a_warning(model_dir, tokenizer, caplog):
    from algos.models.policy import load_policy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(model_dir)
    with caplog.at_level(logging.WARNING, logger="algos.models.policy"):
        _, tok = load_policy(str(model_dir))
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert f"tokenizer of '{model_dir}' has no PAD token; using EOS" in caplog.text


def test_tokenizer_larger_than_the_model_vocabulary(model_dir, tokenizer):
    from algos.models.policy import load_policy

    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens([f"<extra_{i}>" for i in range(8)])
    bigger.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=rf"tokenizer of '{re.escape(str(model_dir))}' has {len(bigger)} tokens but the "
                                         rf"model's input embeddings have only {len(tokenizer)} rows"):
        load_policy(str(model_dir))


# ============================================================================ command line

def test_unknown_algorithm_exits_nonzero_listing_the_subcommands(capsys):
    from experiments.run import main

    with pytest.raises(SystemExit) as exc:
        main(["algo:foo"])
    assert exc.value.code != 0
    err = flat(capsys.readouterr().err)
    for name in ALGORITHMS:
        assert f"algo:{name}" in err, err


def test_unknown_sampler_lists_the_choices(capsys):
    from experiments.run import main

    with pytest.raises(SystemExit) as exc:
        main(["algo:grpo", "--sampler", "tgi"])
    assert exc.value.code != 0
    assert "invalid choice 'tgi' for argument '--sampler'. Expected one of ('fast', 'hf', 'vllm')" in flat(capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["algo:grpo", "--samples-per-prompt", "1"], r"GRPOConfig\.sampling.samples_per_prompt: expected a value >= 2 .*got 1"),
    (["algo:rloo", "--samples-per-prompt", "1"], r"RLOOConfig\.sampling.samples_per_prompt: expected a value >= 2 .*got 1"),
    (["algo:vineppo", "--mc-rollouts", "0"], r"VinePPOConfig\.mc_rollouts: expected a value > 0, got 0"),
    (["algo:vineppo", "--iterations", "-1"], r"iterations: expected (a value )?>= 0, got -1"),
], ids=["grpo-group-1", "rloo-group-1", "vineppo-K-0", "negative-iterations"])
def test_cli_config_value_is_a_usage_error_naming_the_field(tmp_path, capsys, argv, message):
    from experiments.run import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    assert exc.value.code != 0
    assert re.search(message, flat(capsys.readouterr().err))
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--eval-top-p", "1.5", r"RunConfig\.eval_top_p: expected a value in \(0, 1\], got 1\.5"),
    ("--eval-temperature", "-1", r"RunConfig\.eval_temperature: expected a value >= 0, got -1\.0"),
    ("--eval-temperature", "nan", r"RunConfig\.eval_temperature: expected a finite number, got nan"),
    ("--sampler-batch-size", "0", r"RunConfig\.sampler_batch_size: expected a value > 0, got 0"),
], ids=["eval-top-p", "eval-temperature-negative", "eval-temperature-nan", "sampler-batch-size-0"])
def test_cli_run_settings_are_checked_before_anything_is_written(tmp_path, capsys, flag, value, message):
    from experiments.run import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # RunConfig validation: a tyro usage error
        main(["algo:grpo", "--out", str(out), "--wandb", "disabled", flag, value])
    assert exc.value.code != 0
    assert re.search(message, flat(capsys.readouterr().err))
    assert not out.exists()


def test_cli_missing_model_path_is_refused_before_anything_is_written(tmp_path):
    from experiments.run import main

    out, missing = tmp_path / "run", tmp_path / "models" / "nope"
    with pytest.raises(FileNotFoundError, match=rf"model directory not found: '{re.escape(str(missing))}'"):
        main(["algo:grpo", "--model", str(missing), "--out", str(out), "--wandb", "disabled"])
    assert not out.exists()


def test_cli_unknown_task_lists_tasks_before_anything_is_written(tmp_path):
    from experiments.run import main

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; registered tasks: .*gsm8k, (guess, )?math"):
        main(["algo:grpo", "--task", "gsm9k", "--out", str(out), "--wandb", "disabled"])
    assert not out.exists()


# ============================================================================ trainer: run directory and prompts

def _run(out: Path, model: Path | str = "tiny", **overrides):
    from algos.training.config import RunConfig

    settings = {"task": "guess", "model": str(model), "iterations": 0, "out": out, "wandb": "disabled",
                "eval_problems": 2, "eval_sampled": False, "canary_problems": 0, "threads": 1}
    return RunConfig(**{**settings, **overrides})


def _grpo() -> GRPOConfig:
    return with_fields(GRPOConfig(), prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=8,
                       minibatch_size=4, micro_batch_size=2)


@pytest.fixture
def guess_task():
    from conftest import GuessTask

    from langenv.tasks.base import _REGISTRY, register_task

    if "guess" not in _REGISTRY:
        register_task("guess", GuessTask)


@pytest.fixture
def old_run(tmp_path):
    """A run directory holding an earlier run, plus a file of the user's."""
    out = tmp_path / "run"
    (out / "checkpoints" / "iter-000001").mkdir(parents=True)
    (out / "checkpoints" / "iter-000001" / "state.pt").write_bytes(b"\x00old")
    (out / "metrics.jsonl").write_text('{"iteration": 0, "eval/accuracy": 0.5}\n')
    (out / "config.json").write_text('{"algorithm": "grpo"}')
    (out / "summary.json").write_text('{"old": true}')
    (out / "notes.txt").write_text("mine")
    return out


def _no_model_loading(monkeypatch):
    import algos.training.setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(algos.training.setup, "load_model", refuse)


@pytest.mark.parametrize("entry", ["cli", "train"])
def test_existing_run_directory_is_refused_and_left_byte_identical(old_run, guess_task, monkeypatch, entry):
    from algos.training.loop import train
    from experiments.run import main

    _no_model_loading(monkeypatch)
    before = tree(old_run)
    with pytest.raises(FileExistsError) as exc:
        if entry == "cli":
            main(["algo:grpo", "--task", "guess", "--out", str(old_run), "--wandb", "disabled", "--iterations", "1"])
        else:
            train(_run(old_run), "grpo", _grpo(), GRPO)
    message = str(exc.value)
    assert str(old_run) in message and "metrics.jsonl" in message
    assert f"--resume {old_run}" in message and "--overwrite" in message
    assert tree(old_run) == before


def test_overwrite_clears_the_previous_run_but_not_other_files(old_run, guess_model_dir):
    from algos.training.loop import train

    train(_run(old_run, guess_model_dir, overwrite=True), "grpo", _grpo(), GRPO)
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0] and "eval/accuracy" in rows[0]
    assert not (old_run / "checkpoints" / "iter-000001").exists()
    assert json.loads((old_run / "summary.json").read_text()).get("old") is None
    assert (old_run / "notes.txt").read_text() == "mine"


def test_unwritable_output_directory_is_refused_before_the_model_is_loaded(tmp_path, guess_task, monkeypatch):
    from algos.training.loop import train

    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root may write anywhere: report the directory as the kernel would to a user
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out else real_access(p, mode, *a, **k))
    _no_model_loading(monkeypatch)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(out))):
            train(_run(out), "grpo", _grpo(), GRPO)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_output_directory_below_a_file_is_refused(tmp_path, guess_task, monkeypatch):
    from algos.training.loop import train

    (tmp_path / "afile").write_text("x")
    _no_model_loading(monkeypatch)
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "afile"))):
        train(_run(tmp_path / "afile" / "run"), "grpo", _grpo(), GRPO)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory, guess_model_dir):
    """The guess model saved with an 8-token context: every prompt is too long for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("short-context")
    model = AutoModelForCausalLM.from_pretrained(guess_model_dir)
    model.config.max_position_embeddings = 8
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(guess_model_dir).save_pretrained(path)
    return path


def test_prompt_longer_than_the_model_context_names_problem_length_and_limit(tmp_path, short_context_model):
    from algos.training.loop import train

    with pytest.raises(ValueError, match=r"problem guess/(train|test)/\d+: prompt is \d+ tokens, which leaves no room "
                                         r"for a response in a context of 8 tokens \(limit: prompts of at most 7 tokens\)"):
        train(_run(tmp_path / "run", short_context_model), "grpo", _grpo(), GRPO)


def test_tokenizer_without_eos_in_a_run_names_the_model(tmp_path, guess_model_dir, guess_task):
    import shutil

    from experiments.run import main

    model = tmp_path / "model"
    shutil.copytree(guess_model_dir, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = None
    tok.save_pretrained(model)
    with pytest.raises(ValueError, match=rf"tokenizer of '{re.escape(str(model))}' has no EOS token"):
        main(["algo:grpo", "--task", "guess", "--model", str(model), "--out", str(tmp_path / "run"),
              "--wandb", "disabled", "--canary-problems", "0"])


# ------------------------------------------------------------- behaviour that needs trainer wiring

def test_train_with_a_missing_model_writes_nothing(tmp_path, guess_task):
    from algos.training.loop import train

    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        train(_run(out, tmp_path / "no-such-model"), "grpo", _grpo(), GRPO)
    assert not out.exists()


def test_prompt_longer_than_context_is_refused_before_the_run_directory_is_written(tmp_path, short_context_model):
    from algos.training.loop import train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="leaves no room"):
        train(_run(out, short_context_model), "grpo", _grpo(), GRPO)
    assert not out.exists() or tree(out) == {}


@pytest.mark.parametrize("field, value", [("eval_top_p", 1.5), ("eval_temperature", -1.0)])
def test_run_config_rejects_bad_eval_settings(field, value):
    from algos.training.config import RunConfig

    with pytest.raises(ValueError, match=rf"RunConfig\.{field}: expected"):
        RunConfig(**{field: value})
