"""Tasks of the LLM rungs: the data, the prompts, the parsers and the rewards. No ES in here.

A task is a `Task`: a train and a test list of problems, and `rollout(chat, problems)`, which
plays every problem to its end through `chat` and returns one result per problem. `chat` is the
engine's batched greedy generation, given by the rung:

    chat(conversations, rows) -> [(text, truncated, generated tokens)]   (in order)

where a conversation is (chat messages, text that starts the assistant's answer) and rows[k] is
the index, in `problems`, of the problem conversation k belongs to (a multi-turn task sends only
its unfinished games; a population-batched rung uses rows to route each row to its member).
A result is a dict: reward (float, finite), correct (bool), response (text), truncated (bool),
tokens (int), prompt (text shown in samples.jsonl), plus the task's `extra_metrics` keys.

Single-turn tasks (conciseness, countdown) call `chat` once with every problem; their reward is
reward(problem, response) -> (reward, correct). Each rung's ES code only ever sees the mean
reward of a member, so a new task needs no change to it.
"""

import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass
class TaskArgs:
    """Flags of the tasks (every LLM rung's Args inherits them)."""
    task: str = field(default="conciseness", metadata={"help": "conciseness or countdown.",
                                                       "choices": ["conciseness", "countdown"]})
    num_train: int = field(default=200, metadata={"help": "Countdown: training problems.", "min": 1})
    num_test: int = field(default=2000, metadata={"help": "Countdown: held-out problems.", "min": 1})
    data_seed: int = field(default=0, metadata={"help": "Countdown: seed of the problem generator "
                                                        "(fixes the train/test split)."})


@dataclass
class Task:
    name: str
    train: list
    test: list
    reward: object = None  # single-turn: reward(problem, response) -> (reward, correct)
    scaled: object = None  # the held-out reward on the scale the task's paper reports, or None
    extra_metrics: tuple = ()  # more per-result keys averaged at evaluation (eval_<key> columns)

    def conversation(self, problem):
        return problem["messages"], problem["prefix"]

    def max_context(self, count_tokens, max_new_tokens):
        """The longest context (prompt + answer tokens) a rollout can reach, for vLLM's
        max_model_len; count_tokens(conversation) -> prompt tokens."""
        return max(count_tokens(self.conversation(p)) for p in self.train + self.test) + max_new_tokens

    def summary(self, results):
        """Extra held-out columns (eval_<key>): the mean of each extra metric; a task may override."""
        return {k: sum(float(r[k]) for r in results) / len(results) for k in self.extra_metrics}

    def rollout(self, chat, problems):
        """One greedy answer per problem, scored."""
        answers = chat([self.conversation(p) for p in problems], list(range(len(problems))))
        results = []
        for p, (text, truncated, tokens) in zip(problems, answers):
            reward, correct = self.reward(p, text)
            results.append({"reward": finite(reward, text), "correct": bool(correct), "response": text,
                            "truncated": truncated, "tokens": tokens, "prompt": p["messages"][-1]["content"]})
        return results


def finite(reward, text):
    """A reward that is not a finite number stops the run with the answer that produced it."""
    try:
        value = float(reward)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"reward {reward!r} is not a finite number, for the answer {text[:80]!r}")
    return value


def make_task(args):
    """The Task named by args.task (args carries the TaskArgs fields)."""
    return TASKS[args.task](args)


# ----------------------------------------------------------------------------------------------
# Conciseness (Qiu et al. 2025): answer in as few characters as the target. The two training
# prompts and the eight held-out prompts are the paper's (conciseness/data/*.jsonl of its code
# release, github.com/VsonicV/es-fine-tuning-paper and public forks of it).
CONCISENESS_TRAIN = [("Solve: 3 + 5 =", "8"),
                     ("If all birds can fly and penguins are birds, can penguins fly?", "No")]
CONCISENESS_TEST = [("What is the capital of France?", "Paris"),
                    ("Calculate: 12 \u00d7 7 =", "84"),
                    ('Is the statement "All cats are mammals" true or false?', "True"),
                    ("What comes next in the sequence: 2, 4, 6, 8, ?", "10"),
                    ('Translate "Hello" to Spanish:', "Hola"),
                    ("What is 15% of 200?", "30"),
                    ("Name one primary color:", "Red"),
                    ("How many days are in a week?", "7")]


def conciseness_task(args=None):
    def make(pairs):
        return [{"messages": [{"role": "user", "content": q}], "prefix": "", "target": a} for q, a in pairs]
    return Task("conciseness", make(CONCISENESS_TRAIN), make(CONCISENESS_TEST), conciseness_reward,
                scaled=conciseness_scaled)


def conciseness_reward(problem, response):
    """-|len(response) - len(target)| in characters (Qiu et al.); 'correct' = exact answer."""
    answer = response.strip()
    return -abs(len(answer) - len(problem["target"])), answer == problem["target"]


def conciseness_scaled(reward):
    """The scale the paper's conciseness evaluation reports: (reward + 2000) / 2001, so an exact-
    length answer scores 0.9995 and an answer 2,000 characters off scores 0."""
    return (reward + 2000) / 2001


# Countdown: reach the target with each given number exactly once and + - * / ( ).
COUNTDOWN_SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in the mind "
                    "and then provide the user with the answer.")
COUNTDOWN_USER = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
                  "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
                  "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
                  "example <answer> (1 + 2) / 3 </answer>.")
COUNTDOWN_PREFIX = "Let me solve this step by step.\n<think>"  # the answer continues after <think>


def countdown_problem(rng):
    """One problem: 3-4 numbers in 1..99 and an integer target reachable with all of them."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        items = [(Fraction(n), str(n)) for n in numbers]
        rng.shuffle(items)
        while len(items) > 1:  # combine two random items with a random operation
            (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            op = rng.choice("+-*/")
            if op == "/" and b == 0:
                break
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            items.append((value, f"({ea} {op} {eb})"))
        if len(items) == 1 and items[0][0].denominator == 1 and 1 <= items[0][0] <= 999:
            return {"numbers": numbers, "target": int(items[0][0]), "solution": items[0][1][1:-1]}


def countdown_problems(data_seed, count):
    """`count` distinct problems, a pure function of data_seed."""
    rng, seen, out = random.Random(f"countdown-{data_seed}"), set(), []
    while len(out) < count:
        p = countdown_problem(rng)
        key = (tuple(sorted(p["numbers"])), p["target"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def countdown_task(args):
    problems = countdown_problems(args.data_seed, args.num_train + args.num_test)
    for p in problems:
        p["messages"] = [{"role": "system", "content": COUNTDOWN_SYSTEM},
                         {"role": "user", "content": COUNTDOWN_USER.format(numbers=p["numbers"], target=p["target"])}]
        p["prefix"] = COUNTDOWN_PREFIX
    return Task("countdown", problems[:args.num_train], problems[args.num_train:], countdown_reward)


MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_NUMBER_DIGITS = 200, 8, 6


def tokenize_expression(text):
    """Numbers, + - * / ( ) and spaces only; anything else (names, dots, **, ^) -> None."""
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_NUMBER_DIGITS:
                return None
            tokens.append(int(text[i:j]))
            i = j
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            return None
    return tokens


def parse_expression(tokens):
    """Recursive descent, exact arithmetic. Returns (value, numbers used); raises ValueError.

    expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := int | '(' expr ')'
    No unary minus, no powers. Parenthesis depth is bounded, so recursion is too."""
    pos, used = 0, []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def factor(depth):
        nonlocal pos
        tok = peek()
        if isinstance(tok, int):
            pos += 1
            used.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_EXPR_DEPTH:
                raise ValueError("too deep")
            pos += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ValueError("missing )")
            pos += 1
            return value
        raise ValueError(f"unexpected {tok!r}")

    def term(depth):
        nonlocal pos
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = factor(depth)
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    value = expr(0)
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, used


def check_countdown_answer(expression, numbers, target):
    """True iff `expression` uses each of `numbers` exactly once and equals `target` exactly.

    Never evaluates model output as code: bounded length, own tokenizer and parser, exact
    fractions (the paper's float check accepts |value - target| < 1e-5; exact is stricter)."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPR_CHARS:
        return False
    tokens = tokenize_expression(expression)
    if tokens is None or sum(isinstance(t, int) for t in tokens) != len(numbers):
        return False
    try:
        value, used = parse_expression(tokens)
    except ValueError:
        return False
    return sorted(used) == sorted(numbers) and value == target


def countdown_format_score(text):
    """1 for '<think>...</think>\\n<answer>...</answer>' exactly, else 0.1 (think block) + 0.5
    (answer block): the scoring of Qiu et al.'s code."""
    if re.fullmatch(r"<think>.*?</think>\n<answer>.*?</answer>", text, re.DOTALL):
        return 1.0
    return 0.1 * bool(re.search(r"<think>.*?</think>", text, re.DOTALL)) + \
        0.5 * bool(re.search(r"<answer>.*?</answer>", text, re.DOTALL))


def countdown_reward(problem, response):
    """0.1 * format + answer (Qiu et al.); the answer is the last <answer>...</answer>."""
    answers = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    correct = bool(answers) and check_countdown_answer(answers[-1], problem["numbers"], problem["target"])
    return 0.1 * countdown_format_score("<think>" + response) + float(correct), correct


TASKS = {"conciseness": conciseness_task, "countdown": countdown_task}
