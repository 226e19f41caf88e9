"""Tasks of the LLM rungs and the run's record: data, prompts, rewards, chat, metrics. No ES in here.

A task is a `Task`: a train and a test list of problems, and `rollout(chat, problems)`, which
plays every problem to its end through `chat` and returns one result per problem. `chat` is the
engine's batched greedy generation, given by the rung:

    chat(conversations, rows) -> [(text, truncated, generated tokens)]   (in order)

where a conversation is (chat messages, text that starts the assistant's answer) and rows[k] is
the index, in `problems`, of the problem conversation k belongs to (a multi-turn task sends only
its unfinished games; a population-batched rung uses rows to route each row to its member).
A result is a dict: reward (float, finite), correct (bool), response (text), truncated (bool),
tokens (int), prompt (text shown in samples.jsonl), plus the task's `extra_metrics` keys.

Single-turn tasks (conciseness, countdown, one_word) call `chat` once with every problem; their
reward is reward(problem, response) -> (reward, correct). Each rung's ES code only ever sees the
mean reward of a member, so a new task needs no change to it.

A new task: copy the template (one_word_task and one_word_reward, near the end of this file) and
add one line to TASKS at the bottom; `--task <name>` then works in every LLM rung.

After the tasks, the two things every rung's loop calls around its ES step, which a learner may
open too: `make_chat` (a task's conversations -> token ids through the chat template -> the
engine's batched greedy answers; the Stopwatch times it), and the run's record: `evaluate` (the
held-out problems, samples.jsonl, the printed line), metrics.csv (`MetricsLog`, `generation_row`,
the degenerate-generation check) and curve.png (`plot_curves`). With the rung file and
llm_engines.py (how a model is built, served and saved), this is all one generation touches.
"""

import csv
import json
import math
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm


# name -> builder(args) -> Task. Filled at the bottom of this file, the one place a task is registered;
# --task's choices are this dict itself, so they follow it.
TASKS = {}


@dataclass
class TaskArgs:
    """Flags of the tasks (every LLM rung's Args inherits them)."""
    task: str = field(default="conciseness", metadata={"help": "the task: %(choices)s (wordle is multi-turn; a new "
                                                               "task is one entry of llm_tasks.TASKS).",
                                                       "choices": TASKS})
    train_prompts: int = field(default=2, metadata={"help": "Conciseness: training prompts, the paper's 2 first, "
                                                             "then ours of the same kind (CONCISENESS_TRAIN_MORE).",
                                                     "min": 1, "max": 8})
    num_train: int = field(default=200, metadata={"help": "Countdown: training problems.", "min": 1})
    num_test: int = field(default=2000, metadata={"help": "Countdown: held-out problems.", "min": 1})
    data_seed: int = field(default=0, metadata={"help": "Countdown: seed of the problem generator; Wordle: "
                                                        "seed of the secret-word shuffle (either fixes the "
                                                        "train/test split)."})
    # Wordle (see WordleTask)
    wordle_train: int = field(default=200, metadata={"help": "Wordle: training games (secret words).", "min": 1})
    wordle_test: int = field(default=100, metadata={"help": "Wordle: held-out games (other secret words).",
                                                    "min": 1})
    wordle_turns: int = field(default=6, metadata={"help": "Wordle: guesses per game, T. Reward of a game: "
                                                   "1 + (T - n)/T if solved at guess n, else --wordle-info-weight "
                                                   "x the mean over its T turns of (greens + yellows/2)/5; minus "
                                                   "--wordle-invalid-penalty per invalid turn.", "min": 1})
    wordle_invalid_penalty: float = field(default=0.1, metadata={
        "help": "Wordle: reward lost per invalid turn (no <guess>word</guess>, not 5 letters a-z, not in the word "
                "list, a repeated guess); an invalid turn also uses up a guess.", "min": 0})
    wordle_info_weight: float = field(default=0.5, metadata={
        "help": "Wordle: weight of the information credit of an unsolved game (below 1.25, a solved game "
                "outscores every unsolved one with as many invalid turns).", "min": 0})
    wordle_prefix: str = field(default="<guess>", metadata={
        "help": "Wordle: text every answer starts with ('' lets the model write before its tag)."})


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
            reward, correct = reward_pair(self.name, self.reward(p, text), text)
            results.append({"reward": finite(reward, text), "correct": bool(correct), "response": text,
                            "truncated": truncated, "tokens": tokens, "prompt": p["messages"][-1]["content"]})
        return results


def reward_pair(name, out, text):
    """What a single-turn reward returned, checked: a pair (reward, correct). A bare number (the
    usual slip) or anything else stops the run with what the reward must return."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"task {name!r}: its reward(problem, response) must return a pair (reward, correct): "
                        f"reward a finite number (higher is better), correct a bool (shown as held-out "
                        f"accuracy), e.g. `return -len(response), False`; it returned {out!r} for the answer "
                        f"{text[:80]!r}")
    return out


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
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task}: unknown; the tasks are {', '.join(TASKS)} (llm_tasks.TASKS)")
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

# More training prompts of the same kind (ours; --train-prompts takes the paper's 2, then these in
# order), none equal to a held-out or validation prompt.
CONCISENESS_TRAIN_MORE = [("What is the capital of Japan?", "Tokyo"),
                          ("Calculate: 7 + 6 =", "13"),
                          ('Is the statement "The sun is a star" true or false?', "True"),
                          ("What comes next in the sequence: 5, 10, 15, 20, ?", "25"),
                          ('Translate "Cat" to French:', "Chat"),
                          ("How many hours are in a day?", "24")]


# Validation prompts of the same kind (short question, one-word or one-number target), none equal
# to a training or held-out prompt. They exist for tuning: studies/es_vs_grpo.py scores every
# tuning trial (ES sigma x lr, GRPO lr x beta) on these prompts, never on CONCISENESS_TEST, so the
# held-out prompts judge only the chosen settings. No rung trains or evaluates on them by default.
CONCISENESS_VALID = [("What is the capital of Italy?", "Rome"),
                     ("Calculate: 9 \u00d7 6 =", "54"),
                     ('Is the statement "All fish can fly" true or false?', "False"),
                     ("What comes next in the sequence: 3, 6, 9, 12, ?", "15"),
                     ('Translate "Thank you" to French:', "Merci"),
                     ("What is 10% of 50?", "5"),
                     ("Name one planet in our solar system:", "Mars"),
                     ("How many months are in a year?", "12"),
                     ("What is the largest ocean on Earth?", "Pacific"),
                     ("Solve: 20 - 4 =", "16")]

# What counts as a correct answer to each conciseness prompt, for answer_check below (the reward
# cannot see correctness): (accepted words, rejected words). An answer is correct when one accepted
# word (or phrase) is among its words and no rejected one is. Numbers may be written as digits or
# words; a primary colour is any of red, yellow, blue (paint) or green (light).
CONCISENESS_CHECKS = {
    "Solve: 3 + 5 =": (("8", "eight"), ()),
    "If all birds can fly and penguins are birds, can penguins fly?": (("no",), ("yes",)),
    "What is the capital of France?": (("paris",), ()),
    "Calculate: 12 \u00d7 7 =": (("84", "eighty four"), ()),
    'Is the statement "All cats are mammals" true or false?': (("true",), ("false",)),
    "What comes next in the sequence: 2, 4, 6, 8, ?": (("10", "ten"), ()),
    'Translate "Hello" to Spanish:': (("hola",), ()),
    "What is 15% of 200?": (("30", "thirty"), ()),
    "Name one primary color:": (("red", "yellow", "blue", "green"), ()),
    "How many days are in a week?": (("7", "seven"), ()),
    "What is the capital of Italy?": (("rome",), ()),
    "Calculate: 9 \u00d7 6 =": (("54", "fifty four"), ()),
    'Is the statement "All fish can fly" true or false?': (("false",), ("true",)),
    "What comes next in the sequence: 3, 6, 9, 12, ?": (("15", "fifteen"), ()),
    'Translate "Thank you" to French:': (("merci",), ()),
    "What is 10% of 50?": (("5", "five"), ()),
    "Name one planet in our solar system:": (("mercury", "venus", "earth", "mars", "jupiter", "saturn", "uranus",
                                              "neptune"), ()),
    "How many months are in a year?": (("12", "twelve"), ()),
    "What is the largest ocean on Earth?": (("pacific",), ()),
    "Solve: 20 - 4 =": (("16", "sixteen"), ()),
    "What is the capital of Japan?": (("tokyo",), ()),
    "Calculate: 7 + 6 =": (("13", "thirteen"), ()),
    'Is the statement "The sun is a star" true or false?': (("true",), ("false",)),
    "What comes next in the sequence: 5, 10, 15, 20, ?": (("25", "twenty five"), ()),
    'Translate "Cat" to French:': (("chat",), ()),
    "How many hours are in a day?": (("24", "twenty four"), ()),
}
ECHO_COVERAGE = 0.5  # answer_check: an echo repeats at least this share of the question's distinct words


def answer_words(text):
    """Lower-case words and numbers of a text: 'Calculate: 12 x 7 = 84.' -> [calculate, 12, x, 7, 84]
    ('10.5' and '1,000' stay one token; a final full stop is dropped)."""
    return re.findall(r"[a-z]+|\d+(?:[.,]\d+)*", text.lower())


def answer_check(question, answer, checks=None):
    """What the conciseness reward cannot see, for one answer: {"empty", "echo", "correct"}.
    empty: the answer has no letter or digit. echo: the answer is only the question again: every
    word of it is a word of the question, and it repeats at least ECHO_COVERAGE of the question's
    distinct words ('How many days in a week' to 'How many days are in a week?'; '12 x 7 = 84' is
    no echo, 84 is new). correct: one of the prompt's accepted words (CONCISENESS_CHECKS) is among
    the answer's words and no rejected one is; None when the prompt has no check."""
    checks = CONCISENESS_CHECKS if checks is None else checks
    words, asked = answer_words(answer), set(answer_words(question))
    empty = not words
    echo = not empty and set(words) <= asked and len(set(words)) >= ECHO_COVERAGE * len(asked)
    correct = None
    if question in checks:
        accept, reject = checks[question]
        text = " " + " ".join(words) + " "
        correct = (any(f" {a} " in text for a in accept) and not any(f" {r} " in text for r in reject))
    return {"empty": empty, "echo": echo, "correct": correct}


def conciseness_task(args=None):
    def make(pairs):
        return [{"messages": [{"role": "user", "content": q}], "prefix": "", "target": a} for q, a in pairs]
    train = (CONCISENESS_TRAIN + CONCISENESS_TRAIN_MORE)[:getattr(args, "train_prompts", 2)]
    return Task("conciseness", make(train), make(CONCISENESS_TEST), conciseness_reward,
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


# ----------------------------------------------------------------------------------------------
# Wordle: the multi-turn task. A game is a secret 5-letter word and at most 6 guesses; the model
# sees its earlier guesses and their feedback in the conversation, and the reward comes only when
# the game ends. Words: data/wordle_words.txt (SCOWL words ranked by wordfreq frequency; its header
# gives origin and licence): 1000 common words that can be secrets, 4553 words accepted as guesses.
WORDLE_WORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wordle_words.txt")
WORDLE_RULES = ("Let's play Wordle. Guess my secret 5-letter English word in at most {turns} tries. After "
                "each guess I show one mark per letter: G = right letter, right place; Y = in the word, "
                "wrong place; - = not in the word. Reply with your guess only, in this format: "
                "<guess>crane</guess>")  # "crane" is left out of the secrets: copying it never wins
WORDLE_NO_TAG = "no <guess>...</guess>"
WORDLE_NOT_LETTERS = "a guess is 5 letters a-z"
WORDLE_NOT_A_WORD = "not in my word list"
WORDLE_REPEATED = "you guessed it before"
WORDLE_ECHO_CHARS = 40  # an invalid answer is shown back to the model cut to this many characters


def load_wordle_words(path=WORDLE_WORDS):
    """(secrets, guesses): the file's [secrets] words in file order (most frequent first) and the
    frozenset of every valid guess (both sections). '#' lines are comments."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), [])
            elif current is None or not re.fullmatch(r"[a-z]{5}", line):
                raise ValueError(f"{path}: {line!r} is not a 5-letter word of a section")
            else:
                current.append(line)
    secrets = sections.get("secrets", [])
    return secrets, frozenset(secrets) | frozenset(sections.get("guesses", []))


def wordle_split(secrets, data_seed, num_train, num_test):
    """The fixed train/held-out split: `secrets` shuffled by a generator seeded with data_seed;
    the first num_test words are held out, the next num_train are for training. The held-out
    words depend only on (data_seed, num_test), so changing num_train never moves them."""
    if num_train + num_test > len(secrets):
        raise ValueError(f"--wordle-train + --wordle-test = {num_train + num_test} is more than the "
                         f"{len(secrets)} secret words")
    order = list(secrets)
    random.Random(f"wordle-{data_seed}").shuffle(order)
    return order[num_test:num_test + num_train], order[:num_test]


def wordle_feedback(guess, answer):
    """One mark per letter of `guess` (5 letters) against `answer`: 'G' the right letter in the
    right place, 'Y' a letter of the answer in another place, '-' otherwise.

    Repeated letters, the standard rule: greens are marked first; then, left to right, a letter
    is marked 'Y' only while the answer still holds a copy of it that no green and no earlier 'Y'
    has used. So 'eerie' against 'there' is 'Y-Y-G': the last e is green, which leaves one e of
    'there' for the first e of 'eerie' and none for the second."""
    marks, unused = ["-"] * len(guess), {}
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[i] = "G"
        else:
            unused[a] = unused.get(a, 0) + 1
    for i, g in enumerate(guess):
        if marks[i] != "G" and unused.get(g, 0) > 0:
            marks[i] = "Y"
            unused[g] -= 1
    return "".join(marks)


def parse_guess(text, words, previous=()):
    """(guess, None) for a valid turn, (None, reason) for an invalid one; never raises.

    The guess is the text between the first '<guess>' and the first '</guess>' after it (the tags
    in any case), stripped of whitespace and lowercased. Text around the tags and any later tag
    are ignored. Valid iff it is exactly 5 letters a-z, in `words`, and not in `previous`."""
    if not isinstance(text, str):
        return None, WORDLE_NO_TAG
    low = text.lower()  # indices below are all into `low` (lower() may change a text's length)
    start = low.find("<guess>")
    end = low.find("</guess>", start + len("<guess>")) if start >= 0 else -1
    if end < 0:
        return None, WORDLE_NO_TAG
    word = low[start + len("<guess>"):end].strip()
    if not re.fullmatch(r"[a-z]{5}", word):
        return None, WORDLE_NOT_LETTERS
    if word not in words:
        return None, WORDLE_NOT_A_WORD
    if word in previous:
        return None, WORDLE_REPEATED
    return word, None


def wordle_echo(text, limit=WORDLE_ECHO_CHARS):
    """An invalid answer as it is shown back to the model and in transcripts: whitespace runs
    become one space, characters outside printable ASCII become '?', cut to `limit` characters
    (so its tokens are bounded: no tokenizer needs more than one token per ASCII character)."""
    text = " ".join(text.split()) if isinstance(text, str) else ""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


@dataclass
class WordleTurn:
    """One turn of a game: the model's text (after the prefix) and what the game made of it."""
    text: str
    guess: object  # the valid guess, or None for an invalid turn
    note: str  # the feedback marks of a valid guess ("-GY--") or why the turn is invalid
    truncated: bool = False
    tokens: int = 0


def wordle_letters(marks):
    """Information of one valid guess in letters: greens + yellows / 2 (0 to 5)."""
    return marks.count("G") + 0.5 * marks.count("Y")


def wordle_reward(turns, secret, max_turns, invalid_penalty=0.1, info_weight=0.5):
    """The reward of a finished game (T = max_turns, n = turns played, k = invalid turns):

        solved on turn n:  1 + (T - n) / T              1.833 on turn 1 ... 1.0 on turn 6 (T = 6)
        not solved:        info_weight * mean over the n turns of (greens + yellows/2) / 5,
                           an invalid turn counting 0   at most 0.4 with the defaults
        minus invalid_penalty * k in both cases.

    Solving scores more than any unsolved game, and solving earlier more than later. The
    information credit goes to unsolved games only: given to solved games too, it could make
    solving later pay (more good guesses on the way)."""
    solved = bool(turns) and turns[-1].guess == secret
    invalid = sum(t.guess is None for t in turns)
    if solved:
        reward = 1 + (max_turns - len(turns)) / max_turns
    else:
        letters = sum(wordle_letters(t.note) for t in turns if t.guess is not None)
        reward = info_weight * letters / (5 * max(len(turns), 1))
    return reward - invalid_penalty * invalid


@dataclass
class WordleTask(Task):
    """Wordle through chat messages. A game, turn by turn:

      - the conversation: the rules (WORDLE_RULES) as the first user message; then, per turn
        played, the model's answer as an assistant message and the game's reply as a user
        message ("crane -GY--. 5 guesses left." or "Invalid: <reason>. 5 guesses left."); every
        answer starts with `prefix` (default '<guess>', so the model has only to write the word
        and close the tag). A valid answer is put back as '<guess>word</guess>', not as the raw
        text: the model reads its guesses in the one format it is asked for, and contexts stay
        short and bounded (max_context); an invalid answer is put back as wordle_echo(text);
      - parse_guess reads the guess. An invalid turn (no tag, not 5 letters, not a word of the
        list, a repeated guess) uses up one of the max_turns turns and costs invalid_penalty;
      - the game ends when the secret is guessed or max_turns (T) turns are played. Its reward
        (wordle_reward): 1 + (T - n)/T if solved at guess n; else info_weight x the mean over the
        T turns of (greens + yellows/2)/5, an invalid turn counting 0; minus invalid_penalty per
        invalid turn. Held-out metrics (summary): solve rate, mean guesses when solved,
        invalid-turn rate, greens + yellows/2 per valid guess.
    rollout plays all games together: each turn, one chat call with every unfinished game.
    The secret is never in a prompt; a result's `prompt` ("wordle: <secret>") is for samples only.
    """
    words: frozenset = frozenset()  # every valid guess
    max_turns: int = 6
    prefix: str = "<guess>"
    invalid_penalty: float = 0.1
    info_weight: float = 0.5
    extra_metrics: tuple = ("solved", "guesses_when_solved", "invalid_rate", "info_per_guess")

    def rules(self):
        return WORDLE_RULES.format(turns=self.max_turns)

    def conversation(self, problem, turns=()):
        messages = [{"role": "user", "content": self.rules()}]
        for k, turn in enumerate(turns):
            left = self.max_turns - k - 1
            left = f"{left} guess{'' if left == 1 else 'es'} left."
            if turn.guess is None:
                answer, reply = wordle_echo(self.prefix + turn.text), f"Invalid: {turn.note}. {left}"
            else:
                answer, reply = f"<guess>{turn.guess}</guess>", f"{turn.guess} {turn.note}. {left}"
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": reply}]
        return messages, self.prefix

    def finished(self, problem, turns):
        return len(turns) >= self.max_turns or (bool(turns) and turns[-1].guess == problem["secret"])

    def rollout(self, chat, problems):
        """Play every game of `problems` to its end; each turn, one `chat` call with every
        unfinished game (rows = their indices in `problems`)."""
        games = [[] for _ in problems]  # the turns played, per game
        while True:
            rows = [i for i, p in enumerate(problems) if not self.finished(p, games[i])]
            if not rows:
                break
            answers = chat([self.conversation(problems[i], games[i]) for i in rows], rows)
            if len(answers) != len(rows):
                raise ValueError(f"chat returned {len(answers)} answers for {len(rows)} conversations")
            for i, (text, truncated, tokens) in zip(rows, answers):
                text = text if isinstance(text, str) else ""
                previous = [t.guess for t in games[i] if t.guess is not None]
                guess, reason = parse_guess(self.prefix + text, self.words, previous)
                note = wordle_feedback(guess, problems[i]["secret"]) if guess else reason
                games[i].append(WordleTurn(text, guess, note, bool(truncated), int(tokens)))
        return [self.result(p, turns) for p, turns in zip(problems, games)]

    def result(self, problem, turns):
        secret, n = problem["secret"], max(len(turns), 1)
        reward = wordle_reward(turns, secret, self.max_turns, self.invalid_penalty, self.info_weight)
        solved = bool(turns) and turns[-1].guess == secret
        valid = [t for t in turns if t.guess is not None]
        letters = sum((wordle_letters(t.note) for t in valid), 0.0)
        transcript = " | ".join(f"{t.guess} {t.note}" if t.guess is not None else
                                f"[{t.note}] {wordle_echo(self.prefix + t.text)!r}" for t in turns)
        return {"reward": finite(reward, transcript), "correct": solved, "response": transcript,
                "truncated": any(t.truncated for t in turns), "tokens": sum(t.tokens for t in turns),
                "prompt": f"wordle: {secret}", "turns": len(turns), "invalid_turns": len(turns) - len(valid),
                "valid_turns": len(valid), "letters": letters, "solved": float(solved),
                "guesses_when_solved": float(len(turns)) if solved else 0.0,
                "invalid_rate": (len(turns) - len(valid)) / n,
                "info_per_guess": letters / len(valid) if valid else 0.0}

    def summary(self, results):
        """Held-out columns, pooled over games: solved (share of games solved), guesses_when_solved
        (mean turns of the solved games; 0 when none is solved), invalid_rate (invalid turns /
        turns played), info_per_guess (greens + yellows/2 per valid guess; 0 when none)."""
        solved = [r for r in results if r["solved"]]
        turns, valid = sum(r["turns"] for r in results), sum(r["valid_turns"] for r in results)
        return {"solved": len(solved) / len(results) if results else 0.0,
                "guesses_when_solved": sum(r["turns"] for r in solved) / len(solved) if solved else 0.0,
                "invalid_rate": sum(r["invalid_turns"] for r in results) / turns if turns else 0.0,
                "info_per_guess": sum(r["letters"] for r in results) / valid if valid else 0.0}

    def max_context(self, count_tokens, max_new_tokens):
        """Prompt tokens of a game's last turn, at most, plus max_new_tokens. The last prompt holds
        the rules and max_turns - 1 answers and replies. An answer is at most WORDLE_ECHO_CHARS
        printable ASCII characters (a valid one, '<guess>word</guess>', is 20), so at most that
        many tokens; a reply is at most the longest reply form, measured here in context. Four
        tokens a turn of margin for merges across the joins."""
        def tokens(replies):
            messages = [{"role": "user", "content": self.rules()}]
            for reply in replies:
                messages += [{"role": "assistant", "content": ""}, {"role": "user", "content": reply}]
            return count_tokens((messages, self.prefix))
        left = f"{self.max_turns} guesses left."
        forms = [f"zzzzz -Y-GY. {left}"] + [f"Invalid: {r}. {left}" for r in
                                              (WORDLE_NO_TAG, WORDLE_NOT_LETTERS, WORDLE_NOT_A_WORD, WORDLE_REPEATED)]
        reply = max(tokens([f]) for f in forms) - tokens([""])
        return tokens([""] * (self.max_turns - 1)) + (self.max_turns - 1) * (WORDLE_ECHO_CHARS + reply + 4) \
            + max_new_tokens


def wordle_task(args):
    secrets, words = load_wordle_words()
    task = WordleTask("wordle", [], [], words=words, max_turns=args.wordle_turns, prefix=args.wordle_prefix,
                      invalid_penalty=args.wordle_invalid_penalty, info_weight=args.wordle_info_weight)
    in_rules = set(re.findall(r"[a-z]+", task.rules().lower()))  # guess, right, place, ...: a hint in
    secrets = [w for w in secrets if w not in in_rules]           # every prompt, so never a secret
    train, test = wordle_split(secrets, args.data_seed, args.wordle_train, args.wordle_test)

    def problem(secret):  # the opening conversation is the same for every secret
        messages, prefix = task.conversation(None)
        return {"secret": secret, "messages": messages, "prefix": prefix}
    task.train, task.test = [problem(w) for w in train], [problem(w) for w in test]
    return task


# ----------------------------------------------------------------------------------------------
# Chat: a task's conversations -> the engine's batched greedy answers (every rung's `chat`)
# ----------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, messages, prefix=""):
    """Chat template + the task's assistant prefix, as token ids (both engines get ids)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]


class Stopwatch:
    """Seconds per named part: `with clock("generate"): ...` adds the time spent inside."""

    def __init__(self):
        self.seconds, self.inside = {}, None

    @contextmanager
    def __call__(self, part):
        t0, self.inside = time.perf_counter(), part
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0
        self.inside = None  # not reached when the part was interrupted: `inside` names it

    def __getitem__(self, part):
        return self.seconds.get(part, 0.0)


def make_chat(engine, tokenizer, clock=None, members=None):
    """chat(conversations, rows=None) -> [(text, truncated, generated tokens)]: one batched greedy
    call of `engine.generate` (token ids in, token ids out) for all conversations, each a
    (messages, assistant prefix) pair. Without `members`, rows is unused (one model answers every
    row). With members (a list: problem row -> population member), the engine is called as
    engine.generate(ids, [members[r] for r in rows]), so a population-batched engine answers each
    conversation with its member; chat.routed(members) is the same chat with that routing. The
    engine's generate time goes to clock["generate"] when a Stopwatch is given."""
    clock = clock or Stopwatch()

    def chat(conversations, rows=None):
        ids = [prompt_ids(tokenizer, messages, prefix) for messages, prefix in conversations]
        with clock("generate"):
            if members is None:
                out = engine.generate(ids)
            else:
                rows = range(len(ids)) if rows is None else rows
                out = engine.generate(ids, [members[r] for r in rows])
        return [(tokenizer.decode(tokens, skip_special_tokens=True), truncated, len(tokens))
                for tokens, truncated in out]
    chat.routed = lambda routing: make_chat(engine, tokenizer, clock, routing)
    return chat

# ----------------------------------------------------------------------------------------------
# The run's record: the held-out evaluation, metrics.csv, samples.jsonl, curve.png
# ----------------------------------------------------------------------------------------------

def evaluate(task, chat, problems, run_dir, generation, show):
    """One held-out evaluation: play the problems, append them to samples.jsonl, print `show`
    answers and a summary line; returns the metrics row's eval columns."""
    from tqdm import tqdm
    t0 = time.time()
    results = task.rollout(chat, problems)
    write_samples(run_dir, generation, results)
    for r in results[:show]:
        tqdm.write(f"  [gen {generation}] {r['prompt'][:60]!r} -> {r['response'][:100]!r}")
    ev = summarize_eval(results, task)
    tqdm.write(eval_line(generation, ev))
    return {**ev, "seconds_eval": round(time.time() - t0, 3)}


def summarize_eval(results, task=None):
    """Held-out metrics of one evaluation: mean reward (and on the paper's scale where the task
    has one), accuracy, answer length, truncated share, and the task's extra metrics."""
    mean = float(np.mean([r["reward"] for r in results]))
    scale = getattr(task, "scaled", None)
    ev = {"eval_reward": mean, "eval_reward_scaled": scale(mean) if scale else "",
          "eval_accuracy": float(np.mean([bool(r["correct"]) for r in results])),
          "eval_response_chars": float(np.mean([len(r["response"]) for r in results])),
          "eval_truncated": float(np.mean([r["truncated"] for r in results]))}
    summary = getattr(task, "summary", None)
    if summary is not None:
        ev.update({f"eval_{k}": v for k, v in summary(results).items()})
    return ev


def write_samples(run_dir, generation, results):
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps({"generation": generation, "prompt": r["prompt"], "response": r["response"],
                                "reward": r["reward"]}) + "\n")


def eval_line(generation, ev):
    scaled = f" (scaled {ev['eval_reward_scaled']:.4f})" if ev["eval_reward_scaled"] != "" else ""
    return (f"generation {generation}: held-out reward {ev['eval_reward']:.2f}{scaled}, accuracy "
            f"{ev['eval_accuracy']:.2f}, length {ev['eval_response_chars']:.0f} chars, "
            f"truncated {ev['eval_truncated']:.2f}")


METRICS = ["generation", "train_reward_mean", "train_reward_std", "train_reward_min", "train_reward_max",
           "eval_reward", "eval_reward_scaled", "eval_accuracy", "eval_response_chars", "eval_truncated",
           "seconds_generate", "seconds_weights", "seconds_eval", "seconds_total", "train_tokens", "tokens_per_s",
           "degenerate", "nonfinite"]


def read_metrics(path):
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else "") for k, v in row.items()})
    for r in rows:
        r["generation"] = int(r["generation"])
    return rows


class MetricsLog:
    """metrics.csv, one row per generation, flushed at once. A resumed run drops the rows written
    after its checkpoint (they will be produced again, identically)."""

    def __init__(self, run_dir, start, extra=()):
        self.columns = METRICS + [f"eval_{k}" for k in extra]
        path = Path(run_dir) / "metrics.csv"
        self.rows = [r for r in read_metrics(path) if r["generation"] <= start] if path.exists() else []
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(self.rows)
        self.file.flush()

    def log(self, row):
        full = {k: row.get(k, "") for k in self.columns}
        self.writer.writerow(full)
        self.file.flush()
        self.rows.append(full)

    def close(self):
        self.file.close()


def generation_row(generation, fitness, clock, tokens, nonfinite=0):
    """The training columns of one generation's metrics row. nonfinite: members whose answers came
    from inf/NaN logits (rung 5), or 1 when the population's one batched call had any (rung 6)."""
    return {"generation": generation, "degenerate": int(bool(degenerate(fitness, nonfinite))),
            "nonfinite": nonfinite, "train_reward_mean": float(np.mean(fitness)),
            "train_reward_std": float(np.std(fitness)), "train_reward_min": float(np.min(fitness)),
            "train_reward_max": float(np.max(fitness)), "seconds_generate": round(clock["rollout"], 3),
            "seconds_weights": round(clock["perturb"] + clock["restore"] + clock["update"], 3),
            "train_tokens": tokens, "tokens_per_s": round(tokens / max(clock["rollout"], 1e-9), 1)}


def degenerate(fitness, nonfinite):
    """Why a generation taught nothing, with what to try, or "" when it did not: every member scored
    the same (shaping gives zeros: no update), or members answered from inf/NaN logits."""
    if nonfinite:
        return ("members answered from inf/NaN logits (their forward pass blew up, so their rewards say "
                "nothing about the model): --sigma may be too large for this model or dtype")
    if np.all(np.asarray(fitness) == fitness[0]):
        return (f"all {len(fitness)} members scored {fitness[0]:.4g}, so this generation makes no update: "
                "--sigma may be too large (every member broken alike) or too small (no member differs)")
    return ""


def report_degenerate(generation, why, earlier, stop):
    """Print why a generation was degenerate: the first one (or every one with --stop-on-degenerate).
    Returns 1 for a degenerate generation, 0 otherwise (the run counts them)."""
    if why and (stop or not earlier):
        tqdm.write(f"generation {generation} is degenerate: {why}"
                   + ("" if stop else " (reported once; metrics.csv counts them)"))
    return int(bool(why))


def plot_curves(run_dir, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if r["train_reward_mean"] != ""]
    evals = [r for r in rows if r["eval_reward"] != ""]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        g = [r["generation"] for r in train]
        mean = np.array([r["train_reward_mean"] for r in train])
        std = np.array([r["train_reward_std"] for r in train])
        ax1.plot(g, mean, label="train: population mean")
        ax1.fill_between(g, mean - std, mean + std, alpha=0.2, label="train: +- std")
        ax1.plot(g, [r["train_reward_max"] for r in train], ":", label="train: best member")
    if evals:
        ax1.plot([r["generation"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out")
        ax2.plot([r["generation"] for r in evals], [r["eval_response_chars"] for r in evals], "o-",
                 label="held-out answer length (chars)")
        ax2b = ax2.twinx()
        ax2b.plot([r["generation"] for r in evals], [r["eval_truncated"] for r in evals], "s--", color="gray",
                  label="truncated share")
        ax2b.plot([r["generation"] for r in evals], [r["eval_accuracy"] for r in evals], "^--", color="green",
                  label="accuracy")
        ax2b.set_ylim(-0.05, 1.05)
        ax2b.legend(loc="upper right")
    ax1.set(xlabel="generation", ylabel="reward", title=title)
    ax1.legend()
    ax2.set(xlabel="generation", title="held-out answers")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "curve.png", dpi=100)
    plt.close(fig)

# ----------------------------------------------------------------------------------------------
# The template: a single-turn task in two functions. To write your own, copy these two, change the
# prompts and the reward, and add one line to TASKS below.
#   - a problem is a dict with "messages" (the chat so far) and "prefix" (text the answer starts
#     with, usually ""); add whatever the reward needs (here "target");
#   - reward(problem, response) returns a PAIR (reward, correct): reward a finite number, higher is
#     better (ES maximises the mean over the training problems); correct a bool (the held-out
#     "accuracy"; return False if the task has no right answer);
#   - ES moves the weights only if members' rewards differ: a reward with few values (0 or 1) can
#     tie across the whole population, and then the update is exactly zero (train_reward_std = 0 in
#     metrics.csv). A small smooth term (here the characters) breaks such ties.
ONE_WORD_SYSTEM = "Answer with one word only."


def one_word_task(args=None):
    """Answer in one word: the conciseness prompts (each answer is one word or number)."""
    def make(pairs):
        return [{"messages": [{"role": "system", "content": ONE_WORD_SYSTEM}, {"role": "user", "content": q}],
                 "prefix": "", "target": a} for q, a in pairs]
    return Task("one_word", make(CONCISENESS_TRAIN), make(CONCISENESS_TEST), one_word_reward)


def one_word_reward(problem, response):
    """-(words beyond the first) - characters/100: 0 is one word of no length; 'correct' = the
    target word, ignoring case and a final full stop."""
    words = response.split()
    reward = -abs(len(words) - 1) - len(response.strip()) / 100  # the /100 term breaks ties
    return reward, response.strip().rstrip(".").lower() == problem["target"].lower()


# The one place a task is registered: name -> builder(args) -> Task.
TASKS.update({"conciseness": conciseness_task, "countdown": countdown_task, "wordle": wordle_task,
              "one_word": one_word_task})
