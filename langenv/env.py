"""`LanguageEnv`: a resettable Gymnasium environment over a reasoning task.

Observation: the token ids of prompt and response so far, a 1-D int64 array.
Action: a chunk of token ids (one token, a reasoning step or a whole completion).
Reward: on termination, the task's grade of the decoded response (1.0 correct, 0.0 otherwise);
0.0 on every other step and on truncation (the length limit), where no EOS is appended.
Termination: EOS, or one of the task's stop strings in the response text; a stop-string stop cuts
the response before the stop string and appends EOS (`LanguageEnv.stop_cut`).

State is data (`langenv.state.EnvState`): `snapshot()` returns it, `restore(state)` takes it,
and `EnvState.prefix(n)` makes the state of any prefix of a trajectory. `step_states` is the same
transition applied to many states at once with one batched grading call; samplers that produce
whole completions use it so the environment costs far less than generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from langenv import grading
from langenv.state import EnvState, transition
from langenv.tasks.base import Problem, Task, make_task


def encode_prompt(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token ids of a task's prompt ``text``, the one place prompts become tokens.

    With a chat template (``tokenizer.chat_template`` set, as an instruct model's tokenizer has) the
    prompt is the user turn of a conversation, followed by the assistant header:
    ``apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)``; the
    template's end-of-turn token is then expected to be ``tokenizer.eos_token`` (episodes end on it).
    Without one (the tiny model, ``--no-chat-template``, which clears it) the plain encoding
    ``tokenizer(text).input_ids`` (with BOS if the tokenizer adds one).
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return tuple(int(i) for i in ids)
    return tuple(tokenizer(text).input_ids)


def _stop_start(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index of the first character of the earliest stop string in ``text``, or None."""
    return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=None)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class StepResult:
    """The outcome of applying one chunk of tokens to one state.

    Attributes:
        state: the new state.
        reward: 1.0/0.0 grade on termination, else 0.0.
        status: grading status on termination ("correct", "incorrect", "no_answer", "timeout",
            "invalid", or "error" when the grader could not check at all: not a verdict, reward
            0.0, cause in ``info["grading_error"]``), "truncated" on truncation, "running" otherwise.
        text: the decoded response so far, cut before a stop string, without special tokens: the
            text graded on termination (when a token straddles the stop string's start, a little
            longer than the decoded ``state.response_ids``, see `LanguageEnv.stop_cut`).
    """

    state: EnvState
    reward: float
    status: str
    text: str
    info: dict[str, Any] = field(default_factory=dict)


class LanguageEnv(gym.Env):
    """A reasoning task as a Gymnasium environment whose state can be snapshotted and restored.

    Args:
        task: a registered task name (e.g. "gsm8k", "math") or a `Task` instance.
        tokenizer: a Hugging Face tokenizer (must have an EOS token).
        split: which split `reset` samples problems from.
        max_new_tokens: response budget in tokens; reaching it truncates the episode.
        max_context: optional model context size; the response budget is capped so that prompt
            plus response fit.
        grading_timeout_s: hard wall-clock limit per grading check (seconds).

    Raises:
        ValueError: the tokenizer has no EOS token; ``max_new_tokens`` or ``max_context`` is not a
            positive int; the split is unknown to the task or empty; two problems of the split share
            an id. A prompt that does not fit ``max_context`` raises when its episode starts
            (`initial_state`); `check_prompt_lengths` checks a whole split up front.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        task: str | Task = "gsm8k",
        tokenizer: Any = None,
        split: str = "train",
        max_new_tokens: int = 1024,
        max_context: int | None = None,
        grading_timeout_s: float | None = None,
        render_mode: str | None = None,
    ) -> None:
        if tokenizer is None:
            raise ValueError("tokenizer: expected a Hugging Face tokenizer, got None")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; set eos_token first")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if max_context is not None and (
            isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or max_context < 2
        ):
            raise ValueError(f"max_context: expected None or an int >= 2 (prompt plus response tokens), got {max_context!r}")
        self.task: Task = make_task(task) if isinstance(task, str) else task
        self.tokenizer = tokenizer
        self.split = split
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context
        self.grading_timeout_s = grading_timeout_s
        self.render_mode = render_mode
        self.problems: Sequence[Problem] = self.task.load(split)
        if len(self.problems) == 0:
            raise ValueError(f"task {self.task.name!r} split {split!r} has no problems")
        seen: set[str] = set()
        for problem in self.problems:
            if problem.id in seen:
                raise ValueError(
                    f"task {self.task.name!r} split {split!r}: problem id {problem.id!r} is used twice; "
                    "expected unique ids (states, caches and logs identify problems by id)"
                )
            seen.add(problem.id)
        vocab = len(tokenizer)
        #: token ids of an action must lie in [0, vocab_size)
        self.vocab_size = vocab
        self.observation_space = spaces.Sequence(spaces.Discrete(vocab), stack=True)
        self.action_space = spaces.Sequence(spaces.Discrete(vocab), stack=True)
        self._prompt_cache: dict[tuple[str, str], tuple[int, ...]] = {}
        self._state: EnvState | None = None

    # ----------------------------------------------------------------- states
    def prompt_ids(self, problem: Problem) -> tuple[int, ...]:
        """Token ids of a problem's prompt (`encode_prompt`: through the tokenizer's chat template when
        it has one, else plain with BOS if the tokenizer adds one), cached."""
        key = (problem.id, problem.question)  # the question too: a problem from elsewhere may reuse an id
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = encode_prompt(self.tokenizer, self.task.prompt(problem))
            self._prompt_cache[key] = ids
        return ids

    def _check_prompt_fits(self, problem: Problem, prompt: Sequence[int]) -> None:
        if self.max_context is not None and self.max_context - len(prompt) < 1:
            raise ValueError(
                f"problem {problem.id}: prompt is {len(prompt)} tokens, which leaves no room for a response in a "
                f"context of {self.max_context} tokens (limit: prompts of at most {self.max_context - 1} tokens)"
            )

    def check_prompt_lengths(self, problems: Sequence[Problem] | None = None) -> int:
        """Check up front that every prompt leaves room for a response within ``max_context``.

        Tokenizes (and caches) the prompts of ``problems`` (default: the whole split). Call it
        before writing any output, so a too-long prompt fails a run at start instead of mid-way.

        Returns:
            The longest prompt, in tokens (0 for no problems).

        Raises:
            ValueError: naming the first problem whose prompt is too long, its token length and the
                limit.
        """
        longest = 0
        for problem in self.problems if problems is None else problems:
            prompt = self.prompt_ids(problem)
            self._check_prompt_fits(problem, prompt)
            longest = max(longest, len(prompt))
        return longest

    def initial_state(self, problem: Problem) -> EnvState:
        """The state at the start of an episode on ``problem`` (empty response).

        Raises:
            ValueError: if the prompt leaves no room for a response within ``max_context``.
        """
        prompt = self.prompt_ids(problem)
        self._check_prompt_fits(problem, prompt)
        budget = self.max_new_tokens
        if self.max_context is not None:
            budget = min(budget, self.max_context - len(prompt))
        return EnvState(
            problem=problem,
            prompt_ids=prompt,
            max_new_tokens=budget,
            eos_token_id=int(self.tokenizer.eos_token_id),
        )

    def response_text(self, state: EnvState) -> tuple[str, bool]:
        """Decoded response (special tokens removed) cut before the first stop string.

        Returns:
            (text, stopped): ``stopped`` is True when a stop string was found.
        """
        text = self.tokenizer.decode(list(state.response_ids), skip_special_tokens=True)
        cut = _stop_start(text, self.task.stop_strings)
        return (text[:cut], True) if cut is not None else (text, False)

    def stop_cut(self, response_ids: Sequence[int]) -> tuple[str, int | None]:
        """Where a response stopped by a stop string ends: (text, keep).

        ``text`` is the decoded response (special tokens removed) cut right before the first stop
        string (the whole text when there is none): what the grader sees. ``keep`` is None without
        a stop string; otherwise the number of leading tokens the episode keeps: the last token
        boundary at or before the stop string's first character, i.e. the largest ``k`` whose
        ``decode(response_ids[:k])`` is a prefix of ``text`` (found by binary search on its length,
        O(log T) decodes, then stepping back over boundaries that do not decode to a prefix, such as
        a partial UTF-8 character). When a token straddles the boundary (its text holds the end of
        the answer and the start of the stop string, e.g. ``"5\\n"`` for the stop ``"\\nProblem:"``),
        that whole token is dropped, so the kept tokens decode to a proper prefix of ``text``; the
        grade still uses ``text``. The stop string itself is never kept: ``keep`` is smaller than
        the number of tokens whose text first contains it (so ``keep + 1`` tokens fit the budget).
        """
        ids = list(response_ids)
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        start = _stop_start(full, self.task.stop_strings)
        if start is None:
            return full, None
        text = full[:start]

        def decoded(k: int) -> str:
            return self.tokenizer.decode(ids[:k], skip_special_tokens=True)

        lo, hi = 0, len(ids)  # largest k with len(decode(ids[:k])) <= start; k = 0 always qualifies
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(decoded(mid)) <= start:
                lo = mid
            else:
                hi = mid - 1
        while lo > 0 and not text.startswith(decoded(lo)):
            lo -= 1
        return text, lo

    def step_states(self, states: Sequence[EnvState], chunks: Sequence[Sequence[int]]) -> list[StepResult]:
        """Apply ``chunks[i]`` to ``states[i]`` for every i, grading all finished episodes in one call.

        This is the environment's transition for a batch of episodes; `step` is its one-episode
        form. It never mutates the environment. The pure token transition (`transition`: EOS,
        budget) comes first; then, when the response text contains one of the task's stop strings,
        the episode terminates and its response is cut before the stop string and gets EOS
        (`stop_cut`: the tokens up to the last token boundary at or before the stop string, then
        EOS), as the VinePPO code cuts responses before its stop string: the stop string is never
        trained on. The cut may remove tokens of earlier steps (those that began the stop string),
        and the reward is the grade of the text before the stop string (``StepResult.text``).

        Raises:
            ValueError: if the lengths differ or a state is already done.
        """
        if len(states) != len(chunks):
            raise ValueError(f"step_states: {len(states)} states but {len(chunks)} chunks")
        new_states, texts = [], []
        for state, chunk in zip(states, chunks):
            new = transition(state, chunk)
            text, keep = self.stop_cut(new.response_ids)
            if keep is not None:
                response = new.response_ids[:keep] + (new.eos_token_id,)
                new = replace(new, response_ids=response, terminated=True, truncated=False)
            new_states.append(new)
            texts.append(text)
        to_grade = [i for i, s in enumerate(new_states) if s.terminated]
        grades = grading.grade_batch(
            [texts[i] for i in to_grade],
            [new_states[i].problem.answer for i in to_grade],
            kind=self.task.grading_kind,
            timeout_s=self.grading_timeout_s,
        ) if to_grade else []
        by_index = dict(zip(to_grade, grades))
        results = []
        for i, (state, text) in enumerate(zip(new_states, texts)):
            if i in by_index:
                g = by_index[i]
                info = {"grading_error": g.cause} if g.status == "error" else {}
                results.append(StepResult(state, g.reward, g.status, text, info))
            else:
                results.append(StepResult(state, 0.0, "truncated" if state.truncated else "running", text))
        return results

    # -------------------------------------------------------------- gymnasium
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode.

        Options:
            ``problem``: a `Problem` to use; or ``problem_index``: an index into the split.
            Otherwise a problem is drawn with ``self.np_random``.
        """
        super().reset(seed=seed)
        options = options or {}
        if "problem" in options:
            problem = options["problem"]
        else:
            index = options.get("problem_index")
            if index is None:
                index = int(self.np_random.integers(len(self.problems)))
            if not 0 <= index < len(self.problems):
                raise ValueError(f"problem_index: expected 0..{len(self.problems) - 1}, got {index}")
            problem = self.problems[index]
        self._state = self.initial_state(problem)
        return self._observation(), {"problem_id": problem.id}

    def check_action(self, action: Any) -> list[int]:
        """The action as a list of token ids, after checking that it is a 1-D sequence of integer
        ids in ``[0, vocab_size)`` (a list, tuple or 1-D integer array; may be empty).

        Raises:
            ValueError: naming the bad value and the valid range (a string, a scalar, a 2-D array,
                floats, booleans, an id < 0 or >= ``vocab_size``).
        """
        valid = f"expected a 1-D sequence of integer token ids in [0, {self.vocab_size})"
        if isinstance(action, (str, bytes)):
            raise ValueError(f"action: {valid}, got a {type(action).__name__} {action[:50]!r}; encode text with the tokenizer first")
        try:
            arr = np.asarray(action)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise ValueError(f"action: {valid}, got {_short(action)} ({exc})") from None
        if arr.ndim != 1:
            raise ValueError(f"action: {valid}, got a {arr.ndim}-D value of shape {arr.shape}: {_short(action)}")
        if arr.size == 0:
            return []
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            bad = next((t for t in arr.tolist() if isinstance(t, bool) or not isinstance(t, int)), arr[0])
            raise ValueError(f"action: {valid}, got {bad!r} ({type(bad).__name__}) in {_short(action)}")
        out = [int(t) for t in arr.tolist()]
        bad = next((t for t in out if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"action: token id {bad} is outside the vocabulary [0, {self.vocab_size}) in {_short(action)}")
        return out

    def step(self, action):
        """Append a chunk of token ids; returns (obs, reward, terminated, truncated, info).

        ``info`` has "status" (see `StepResult`), "text" and "problem_id".

        Raises:
            RuntimeError: before `reset`.
            ValueError: the action is not a 1-D sequence of integer ids in ``[0, vocab_size)``
                (`check_action`); the state is unchanged.
            langenv.grading.GradingError: the episode ended but the grader could not check it at
                all (status "error", an infrastructure failure, never a 0 reward); the state is
                unchanged, so the same step can be retried once grading works.
        """
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        chunk = self.check_action(action)
        result = self.step_states([self._state], [chunk])[0]
        if result.status == "error":
            raise grading.GradingError(
                f"problem {result.state.problem.id!r}: {result.info.get('grading_error', 'the grader could not check the answer')}")
        self._state = result.state
        info = {"status": result.status, "text": result.text, "problem_id": result.state.problem.id}
        return self._observation(), result.reward, result.state.terminated, result.state.truncated, info

    def snapshot(self) -> EnvState:
        """The current state (immutable, picklable)."""
        if self._state is None:
            raise RuntimeError("call reset() before snapshot()")
        return self._state

    def restore(self, state: EnvState) -> np.ndarray:
        """Make ``state`` the current state; returns its observation."""
        if not isinstance(state, EnvState):
            raise TypeError(f"restore: expected an EnvState, got {type(state).__name__}")
        self._state = state
        return self._observation()

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._state is None:
            return None
        return self.tokenizer.decode(list(self._state.token_ids))

    def _observation(self) -> np.ndarray:
        return np.asarray(self._state.token_ids, dtype=np.int64)
