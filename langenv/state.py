"""Environment state as data, and the pure token-level transition.

An `EnvState` is an immutable, picklable snapshot of one episode: the problem, the prompt's token
ids and the response's token ids so far. Any prefix of any trajectory is itself a state
(`EnvState.prefix`), which is what VinePPO's Monte-Carlo value estimate needs: restore the prefix,
sample K continuations, grade them, average (Kazemnejad et al. 2024, §4).

The transition here is pure (no tokenizer, no grading): it appends a chunk of token ids, stops at
the first EOS (terminated) or at the token budget (truncated). Stop strings and rewards need the
tokenizer and the task, so `langenv.env` applies them on top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from langenv.tasks.base import Problem


@dataclass(frozen=True)
class EnvState:
    """One episode's state: prompt plus the response so far.

    Attributes:
        problem: the task problem being solved.
        prompt_ids: prompt token ids (including BOS when the tokenizer adds one), length P.
        response_ids: response token ids so far, length T <= max_new_tokens; includes the final
            EOS when the episode terminated (on EOS, or on a stop string: then the response is cut
            before the stop string and EOS appended, see `langenv.env.LanguageEnv.stop_cut`).
        max_new_tokens: the response budget in tokens; reaching it truncates the episode.
        eos_token_id: the id whose emission terminates the episode.
        terminated: the response ended (EOS or a stop string).
        truncated: the response hit ``max_new_tokens`` without ending (reward 0, no EOS).
    """

    problem: Problem
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...] = ()
    max_new_tokens: int = 1024
    eos_token_id: int = 0
    terminated: bool = False
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if len(self.response_ids) > self.max_new_tokens:
            raise ValueError(
                f"response_ids: expected at most max_new_tokens={self.max_new_tokens} tokens, "
                f"got {len(self.response_ids)}"
            )

    @property
    def done(self) -> bool:
        """True once the episode terminated or was truncated."""
        return self.terminated or self.truncated

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt and response token ids together, shape (P + T,)."""
        return self.prompt_ids + self.response_ids

    def prefix(self, n_tokens: int) -> "EnvState":
        """The state after the first ``n_tokens`` response tokens of this trajectory.

        ``prefix(len(response_ids))`` is this state itself; any shorter prefix is a live
        (not done) state from which the episode can be continued.

        Raises:
            ValueError: if ``n_tokens`` is negative or longer than the response.
        """
        if not 0 <= n_tokens <= len(self.response_ids):
            raise ValueError(
                f"n_tokens: expected 0..{len(self.response_ids)} (the response length), got {n_tokens}"
            )
        if n_tokens == len(self.response_ids):
            return self
        return replace(self, response_ids=self.response_ids[:n_tokens], terminated=False, truncated=False)


def transition(state: EnvState, tokens: Sequence[int]) -> EnvState:
    """Append a chunk of token ids to a live state.

    The chunk is cut after its first EOS (the episode terminates) or at the token budget (the
    episode is truncated; no EOS is added: the "EOS trick" of the VinePPO code,
    episode_generators/episode_generator_with_reward_function.py). An EOS that lands exactly on
    the last allowed token terminates rather than truncates.

    Args:
        state: a state that is not done.
        tokens: token ids to append, any length (an empty chunk changes nothing).

    Raises:
        ValueError: if the state is already done.
    """
    if state.done:
        raise ValueError("cannot step a finished episode (terminated or truncated); reset or restore first")
    room = state.max_new_tokens - len(state.response_ids)
    chunk = [int(t) for t in tokens]
    terminated = False
    if state.eos_token_id in chunk:
        cut = chunk.index(state.eos_token_id) + 1
        if cut <= room:
            chunk, terminated = chunk[:cut], True
    chunk = chunk[:room]
    response = state.response_ids + tuple(chunk)
    truncated = not terminated and len(response) >= state.max_new_tokens
    return replace(state, response_ids=response, terminated=terminated, truncated=truncated)
