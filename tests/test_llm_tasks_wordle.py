"""Wordle task of llm_tasks.py: feedback, parser, word list and split, and full games played
through WordleTask.rollout by scripted players (fake `chat` functions, no model)."""

import random
import re
import time

import pytest

import llm_tasks as T

SECRETS, WORDS = T.load_wordle_words()


def make_wordle(**overrides):
    args = T.TaskArgs(task="wordle")
    for k, v in overrides.items():
        setattr(args, k, v)
    return T.make_task(args)


# ---- feedback --------------------------------------------------------------------------------
@pytest.mark.parametrize("guess, answer, marks", [
    ("crane", "crane", "GGGGG"),  # all green
    ("pluck", "wrist", "-----"),  # no letter in common
    ("least", "slate", "YYGYY"),  # an anagram: one green, the rest yellow
    ("speed", "abide", "--Y-Y"),  # two e in the guess, one in the answer: only the first is Y
    ("eerie", "there", "Y-Y-G"),  # the green e is counted first, leaving one e for the first e
    ("eerie", "crane", "--Y-G"),  # the answer's only e is green: the earlier e's get nothing
    ("geese", "those", "---GG"),  # three e in the guess, one in the answer, and it is green
    ("llama", "label", "GYY--"),  # l green, the second l yellow; the second a finds no a left
    ("belle", "level", "-GYYY"),  # two l in both, none in place: both yellow
    ("mamma", "maxim", "GGY--"),  # three m in the guess, two in the answer, one green
    ("abbey", "kebab", "YYGY-"),  # repeated b: one green, one yellow
])
def test_feedback_cases(guess, answer, marks):
    assert T.wordle_feedback(guess, answer) == marks


def test_feedback_rule_holds_on_random_pairs():
    """The rule, checked on 3000 pairs of real words: G exactly where the letters agree; for each
    letter, G + Y = min(its count in the guess, its count in the answer); its Y's are its leftmost
    non-green places in the guess."""
    rng, words = random.Random(0), sorted(WORDS)
    for _ in range(3000):
        guess, answer = rng.choice(words), rng.choice(words)
        marks = T.wordle_feedback(guess, answer)
        assert [m == "G" for m in marks] == [g == a for g, a in zip(guess, answer)]
        for c in set(guess):
            places = [i for i, g in enumerate(guess) if g == c]
            greens = sum(marks[i] == "G" for i in places)
            yellows = min(guess.count(c), answer.count(c)) - greens
            assert [i for i in places if marks[i] == "Y"] == [i for i in places if marks[i] != "G"][:yellows]


# ---- parser ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, previous, expected", [
    ("<guess>crane</guess>", (), ("crane", None)),
    ("  <GUESS> Crane </Guess> because it has common letters", (), ("crane", None)),  # case, spaces
    ("Sure! My guess is <guess>\n\tcrane\n</guess>.", (), ("crane", None)),  # whitespace inside
    ("<guess>crane</guess><guess>slate</guess>", (), ("crane", None)),  # two tags: the first counts
    ("</guess> <guess>slate</guess>", (), ("slate", None)),  # a stray closing tag first
    ("<guess><guess>crane</guess></guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # nested
    ("crane", (), (None, T.WORDLE_NO_TAG)),
    ("<guess>crane", (), (None, T.WORDLE_NO_TAG)),  # never closed
    ("</guess>crane<guess>", (), (None, T.WORDLE_NO_TAG)),  # closed before it opens
    ("<guess >crane</guess>", (), (None, T.WORDLE_NO_TAG)),
    ("", (), (None, T.WORDLE_NO_TAG)),
    ("<guess></guess>", (), (None, T.WORDLE_NOT_LETTERS)),
    ("<guess>cr4ne</guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # a digit
    ("<guess>12345</guess>", (), (None, T.WORDLE_NOT_LETTERS)),
    ("<guess>cranes</guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # too long
    ("<guess>cran</guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # too short
    ("<guess>cr ne</guess>", (), (None, T.WORDLE_NOT_LETTERS)),
    ("<guess>cr\u00e2ne</guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # a non-ASCII letter
    ("<guess>\uff23\uff32\uff21\uff2e\uff25</guess>", (), (None, T.WORDLE_NOT_LETTERS)),  # fullwidth CRANE
    ("<guess>xyzzy</guess>", (), (None, T.WORDLE_NOT_A_WORD)),
    ("<guess>Crane</guess>", ("crane",), (None, T.WORDLE_REPEATED)),
    ("\u0130" * 50 + "<guess>crane</guess>", (), ("crane", None)),  # lower() lengthens the text
    (None, (), (None, T.WORDLE_NO_TAG)),
    (12345, (), (None, T.WORDLE_NO_TAG)),
    (b"<guess>crane</guess>", (), (None, T.WORDLE_NO_TAG)),
])
def test_parser_cases(text, previous, expected):
    assert T.parse_guess(text, WORDS, previous) == expected


def test_parser_survives_garbage_quickly():
    rng = random.Random(0)
    garbage = ["".join(chr(rng.randrange(1, 0x3000)) for _ in range(10_000)),
               "<guess>" * 2000, "</guess>" * 2000, "<guess>" + "a" * 10_000 + "</guess>",
               "".join(rng.choice("<guess>/ \n") for _ in range(10_000)),
               "\x00" * 10_000 + "<guess>crane</guess>"]
    start = time.perf_counter()
    results = [T.parse_guess(g, WORDS) for g in garbage]
    assert time.perf_counter() - start < 1.0
    assert [guess for guess, _ in results] == [None] * 5 + ["crane"]


def test_echo_is_short_printable_ascii():
    assert T.wordle_echo("hello\n\n  world") == "hello world"
    assert T.wordle_echo("caf\u00e9 \U0001f600") == "caf? ?"
    assert len(T.wordle_echo("x" * 10_000)) == T.WORDLE_ECHO_CHARS
    assert T.wordle_echo(None) == ""


# ---- word list and split ---------------------------------------------------------------------
def test_word_list():
    assert len(SECRETS) == 1000 == len(set(SECRETS))
    assert set(SECRETS) <= WORDS and len(WORDS) > 4000
    assert all(len(w) == 5 and w.isascii() and w.isalpha() and w.islower() for w in WORDS)
    assert "crane" in WORDS and "crane" not in SECRETS  # the prompt's example never wins a game
    assert {"about", "house", "water", "light"} <= set(SECRETS)
    with open(T.WORDLE_WORDS, encoding="utf-8") as f:
        header = f.read(4000)
    assert "SCOWL" in header and "wordfreq" in header and "CC BY-SA 4.0" in header


def test_split_is_deterministic_and_disjoint():
    train, test = T.wordle_split(SECRETS, 0, 200, 100)
    assert (train, test) == T.wordle_split(SECRETS, 0, 200, 100)
    assert len(train) == 200 and len(test) == 100 and not set(train) & set(test)
    other_train, other_test = T.wordle_split(SECRETS, 1, 200, 100)
    assert other_test != test and other_train != train
    assert T.wordle_split(SECRETS, 0, 50, 100)[1] == test  # held-out words do not move with num_train
    assert T.wordle_split(SECRETS, 0, 200, 100) == T.wordle_split(list(SECRETS), 0, 200, 100)
    with pytest.raises(ValueError, match="secret words"):
        T.wordle_split(SECRETS, 0, 900, 101)


def test_make_task_wires_the_flags():
    assert "wordle" in T.TASKS and "wordle" in T.TaskArgs.__dataclass_fields__["task"].metadata["choices"]
    for name, f in T.TaskArgs.__dataclass_fields__.items():
        assert f.metadata.get("help"), name
    task = make_wordle(wordle_train=30, wordle_test=20, data_seed=3, wordle_turns=4, wordle_prefix="",
                       wordle_invalid_penalty=0.2, wordle_info_weight=0.25)
    assert isinstance(task, T.WordleTask) and task.name == "wordle"
    in_rules = set(re.findall(r"[a-z]+", task.rules().lower()))
    assert {"guess", "right", "place", "wrong", "crane"} <= in_rules
    assert [p["secret"] for p in task.test] == T.wordle_split([w for w in SECRETS if w not in in_rules], 3, 30, 20)[1]
    assert (task.max_turns, task.prefix, task.invalid_penalty, task.info_weight) == (4, "", 0.2, 0.25)
    for p in task.train + task.test:  # the opening conversation is the same for every secret
        assert (p["messages"], p["prefix"]) == task.conversation(None) == task.conversation(p)
    big = make_wordle(wordle_train=600, wordle_test=300)
    assert not {p["secret"] for p in big.train + big.test} & in_rules
    assert "at most 4 tries" in task.train[0]["messages"][0]["content"]
    assert "<guess>crane</guess>" in task.train[0]["messages"][0]["content"]


# ---- reward ----------------------------------------------------------------------------------
def turn(guess, marks=None, secret=None):
    """A valid turn (marks from the secret) or, with guess=None, an invalid one."""
    if guess is None:
        return T.WordleTurn("junk", None, T.WORDLE_NO_TAG)
    return T.WordleTurn(guess + "</guess>", guess, marks or T.wordle_feedback(guess, secret))


def test_reward_by_hand():
    solve = lambda n: [turn("xxxxx", "-----")] * (n - 1) + [turn("about", "GGGGG")]
    assert T.wordle_reward(solve(1), "about", 6) == pytest.approx(1 + 5 / 6)
    assert T.wordle_reward(solve(6), "about", 6) == pytest.approx(1.0)
    assert T.wordle_reward([turn(None)] * 6, "about", 6) == pytest.approx(-0.6)
    unsolved = [turn("later", "-GGGG")] + [turn("xxxxx", "YY---")] * 5  # 4 + 5 * 1 letters
    assert T.wordle_reward(unsolved, "water", 6) == pytest.approx(0.5 * 9 / 30)
    assert T.wordle_reward([turn(None), turn("about", "GGGGG")], "about", 6) == pytest.approx(1 + 4 / 6 - 0.1)
    assert T.wordle_reward([], "about", 6) == 0.0
    # the ordering the definition promises: earlier solves > later solves > the best unsolved game
    rewards = [T.wordle_reward(solve(n), "about", 6) for n in range(1, 7)]
    best_unsolved = T.wordle_reward([turn("xxxxx", "GGGG-")] * 6, "about", 6)
    assert rewards == sorted(rewards, reverse=True) and rewards[-1] > best_unsolved == pytest.approx(0.4)


# ---- scripted players: full games through rollout --------------------------------------------
class ScriptedChat:
    """A fixed policy: game `row` answers scripts[row][k] at its turn k (k read from the number of
    assistant messages in its conversation). Records every call's rows and conversations."""

    def __init__(self, scripts, truncated=()):
        self.scripts, self.truncated, self.calls = scripts, set(truncated), []

    def __call__(self, conversations, rows):
        self.calls.append((list(rows), conversations))
        out = []
        for (messages, prefix), row in zip(conversations, rows):
            k = sum(m["role"] == "assistant" for m in messages)
            out.append((self.scripts[row][k], (row, k) in self.truncated, 3 + k))
        return out


GAMES = [  # (secret, the answers after the '<guess>' prefix, marks of the valid turns by hand)
    ("about", ["about</guess>"], ["GGGGG"]),  # solved on turn 1
    ("house", ["crane</guess>", "mouse</guess>", "house</guess>"], ["----G", "-GGGG", "GGGGG"]),  # turn 3
    ("water", [g + "</guess>" for g in ("about", "house", "crane", "later", "tower", "sweet")],
     ["Y---Y", "----Y", "-YY-Y", "-GGGG", "Y-YGG", "-Y-GY"]),  # never solved
    ("money", ["", "I think the answer is money", "xyzzy</guess>", "x" * 10_000,
               "cr4ne</guess>", "\U0001f600</guess>"], []),  # all invalid
    ("light", ["night</guess>", " NIGHT </guess>", "blah", "light</guess> or <guess>sight</guess>"],
     ["-GGGG", "GGGGG"]),  # a mix: valid, repeated, no tag, solved on turn 4
]
HAND_REWARDS = [1 + 5 / 6,                                      # turn 1: 1 + (6 - 1)/6
                1 + 3 / 6,                                      # turn 3: 1 + (6 - 3)/6
                0.5 * (1 + 0.5 + 1.5 + 4 + 3 + 2) / (5 * 6),    # letters 12 over 6 turns: 0.2
                -0.1 * 6,                                       # six invalid turns
                1 + 2 / 6 - 0.1 * 2]                            # turn 4, two invalid turns


def test_scripted_games_rewards_rows_and_conversations():
    task = make_wordle()
    problems = [{"secret": s, "messages": [], "prefix": "<guess>"} for s, _, _ in GAMES]
    chat = ScriptedChat([script for _, script, _ in GAMES], truncated={(3, 3)})
    results = task.rollout(chat, problems)

    assert [r["reward"] for r in results] == pytest.approx(HAND_REWARDS)
    # one call per turn, each with exactly the unfinished games
    assert [rows for rows, _ in chat.calls] == [[0, 1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [2, 3, 4],
                                                [2, 3], [2, 3]]
    assert [r["correct"] for r in results] == [True, True, False, False, True]
    assert [r["turns"] for r in results] == [1, 3, 6, 6, 4]
    assert [r["invalid_turns"] for r in results] == [0, 0, 0, 6, 2]
    assert [r["tokens"] for r in results] == [3, 3 + 4 + 5, 33, 33, 3 + 4 + 5 + 6]
    assert [r["truncated"] for r in results] == [False, False, False, True, False]
    assert [r["prompt"] for r in results] == [f"wordle: {s}" for s, _, _ in GAMES]
    assert results[1]["response"] == "crane ----G | mouse -GGGG | house GGGGG"
    assert results[4]["info_per_guess"] == pytest.approx((4 + 5) / 2)
    assert results[4]["invalid_rate"] == pytest.approx(2 / 4)

    # the conversation of every call holds the earlier guesses and their feedback
    for rows, conversations in chat.calls:
        for row, (messages, prefix) in zip(rows, conversations):
            secret, script, marks = GAMES[row]
            assert prefix == "<guess>" and messages[0] == {"role": "user", "content": task.rules()}
            played = (len(messages) - 1) // 2
            valid = iter(marks)
            for k in range(played):
                answer, reply = messages[1 + 2 * k], messages[2 + 2 * k]
                assert answer["role"] == "assistant" and reply["role"] == "user"
                assert reply["content"].endswith(f"{6 - k - 1} guess{'' if k == 4 else 'es'} left.")
                guess, reason = T.parse_guess("<guess>" + script[k], WORDS, [])
                if reply["content"].startswith("Invalid"):
                    assert answer["content"] == T.wordle_echo("<guess>" + script[k])
                else:  # a valid answer comes back normalised, with its feedback
                    assert answer["content"] == f"<guess>{guess}</guess>"
                    assert reply["content"].startswith(f"{guess} {next(valid)}.")
    assert not any("water" in m["content"] for _, convs in chat.calls for c in convs for m in c[0])

    summary = task.summary(results)
    assert summary == pytest.approx({"solved": 3 / 5, "guesses_when_solved": (1 + 3 + 4) / 3,
                                     "invalid_rate": 8 / 20, "info_per_guess": (5 + 10 + 12 + 0 + 9) / 12})
    assert set(summary) == set(task.extra_metrics)


def test_the_mix_game_replies():
    task = make_wordle()
    chat = ScriptedChat([GAMES[4][1]])
    task.rollout(chat, [{"secret": "light"}])
    last = chat.calls[-1][1][0][0]
    assert [m["content"] for m in last[1:]] == [
        "<guess>night</guess>", "night -GGGG. 5 guesses left.",
        "<guess> NIGHT </guess>", f"Invalid: {T.WORDLE_REPEATED}. 4 guesses left.",
        "<guess>blah", f"Invalid: {T.WORDLE_NO_TAG}. 3 guesses left."]


def test_empty_prefix_and_fewer_turns():
    task = make_wordle(wordle_prefix="", wordle_turns=2)
    chat = ScriptedChat([["My guess: <guess>about</guess>", "<guess>house</guess>"], ["about", "house"]])
    results = task.rollout(chat, [{"secret": "house"}, {"secret": "house"}])
    assert [r["reward"] for r in results] == pytest.approx([1.0, -0.2])  # 1 + (2 - 2)/2; two invalid turns
    assert len(chat.calls) == 2


def test_garbage_players_never_raise():
    """Hostile answers in every game: the games end, the rewards are finite, nothing raises."""
    rng = random.Random(1)
    pieces = ["<guess>", "</guess>", "crane", "about", "\n", " ", "\U0001f600", "\u0130", "4", "GGGGG", "x" * 500]

    def chat(conversations, rows):
        out = []
        for _ in rows:
            kind = rng.randrange(4)
            text = ("".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40))) if kind == 0 else
                    None if kind == 1 else
                    "".join(chr(rng.randrange(1, 0x10000)) for _ in range(rng.randrange(10_000))) if kind == 2 else
                    rng.choice(sorted(WORDS)) + "</guess>")
            out.append((text, bool(rng.randrange(2)), rng.randrange(64)))
        return out

    task = make_wordle()
    results = task.rollout(chat, task.test[:40])
    assert len(results) == 40 and all(1 <= r["turns"] <= 6 for r in results)
    assert all(-0.6 - 1e-9 <= r["reward"] <= 1 + 5 / 6 + 1e-9 for r in results)
    assert all(set(r) >= {"reward", "correct", "response", "truncated", "tokens", "prompt", *task.extra_metrics}
               for r in results)
    assert all(0 <= v < 10 for v in task.summary(results).values())


def test_chat_answering_the_wrong_number_of_rows_is_an_error():
    task = make_wordle()
    with pytest.raises(ValueError, match="answers"):
        task.rollout(lambda conversations, rows: [], task.test[:2])


def test_summary_of_nothing_solved():
    results = [{"solved": 0.0, "turns": 6, "valid_turns": 0, "invalid_turns": 6, "letters": 0.0}]
    assert make_wordle().summary(results) == {"solved": 0.0, "guesses_when_solved": 0.0,
                                              "invalid_rate": 1.0, "info_per_guess": 0.0}
    assert make_wordle().summary([]) == {"solved": 0.0, "guesses_when_solved": 0.0, "invalid_rate": 0.0,
                                         "info_per_guess": 0.0}


# ---- max_context -----------------------------------------------------------------------------
def render(conversation):
    """A chat template stand-in: role markers, contents, the generation prompt and the prefix."""
    messages, prefix = conversation
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n" + prefix


@pytest.mark.parametrize("count_tokens", [
    lambda c: len(render(c).encode("utf-8")),  # one token per byte: a byte-level BPE's worst case
    lambda c: len(render(c).split()),  # a coarse tokenizer: the bound must not rely on bytes
])
def test_max_context_bounds_every_prompt_of_hostile_games(count_tokens):
    rng = random.Random(2)
    seen = []

    def chat(conversations, rows):
        seen.extend(count_tokens(c) for c in conversations)
        return [("".join(chr(rng.randrange(0x80, 0x10000)) for _ in range(200)) if rng.randrange(2) else
                 rng.choice(sorted(WORDS)) + "</guess>", False, 1) for _ in rows]

    for turns in (1, 6, 12):
        task = make_wordle(wordle_turns=turns)
        seen.clear()
        task.rollout(chat, task.test[:20])
        bound = task.max_context(count_tokens, 64) - 64
        assert max(seen) <= bound
        assert bound < count_tokens(task.conversation(task.test[0])) + turns * 200  # and not absurdly loose
