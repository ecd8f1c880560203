"""Built-in multi-turn environments of data.py: gridworld, guess and boxes (SPEC §1, §5)."""
import random
import time

import pytest

from data import (BOXES_EXPERT_READS, CHAR_ALPHABET, GAME_OVER, GRIDWORLD_MOVES, MAX_ACTION_CHARS, MAX_BOXES_TRIED,
                  SYNTHETIC_TASKS, TRAINER_REPEAT_LIMIT, BoxesEnv, Example, GridworldEnv, GuessEnv, load_task,
                  parse_knobs, split_of)

ENV_TASKS = ["gridworld", "guess", "boxes"]
# Actions a policy might send: right ones, near misses and noise.
SOME_ACTIONS = ["up", "down", "left", "right", "Right.", "\\boxed{left}", "jump", "", "7", "12", "I guess 10.",
                "1 2", "25", "-3", "<think>hm</think>\n\ndown"]


def play(env, actions):
    """reset, then step every action: [(observation, reward, done)] after the reset's (task, observation)."""
    return [env.reset()] + [env.step(a) for a in actions]


def fresh_example(task, example):
    """The same instance from a fresh environment each time: what a retry does."""
    return task.env(example)


@pytest.fixture(scope="module")
def tasks():
    return {("gridworld", "train"): load_task("gridworld", split="train", seed=0, n=300),
            ("gridworld", "test"): load_task("gridworld", split="test", seed=0, n=300),
            ("guess", "train"): load_task("guess", split="train", seed=0),
            ("guess", "test"): load_task("guess", split="test", seed=0),
            ("boxes", "train"): load_task("boxes", split="train", seed=0, n=1000),
            ("boxes", "test"): load_task("boxes", split="test", seed=0)}


def test_registered_and_loadable():
    assert {"gridworld", "guess"} <= set(SYNTHETIC_TASKS)
    task = load_task("gridworld", split="test", seed=0, size=4)
    assert len(task.examples) == 500 and task.name == "gridworld"
    assert len(load_task("gridworld", split="train", seed=0, n=7).examples) == 7
    guess = load_task("guess", split="test", seed=0)
    assert (len(load_task("guess", split="train").examples), len(guess.examples)) == (1368, 152)  # the docstring's
    with pytest.raises(ValueError, match="gridworld"):   # the error lists the built-in names
        load_task("gridworl")
    with pytest.raises(ValueError, match="synthetic"):
        load_task("guess", path="x.jsonl")


@pytest.mark.parametrize("name", ENV_TASKS)
def test_deterministic_per_example(tasks, name):
    task = tasks[name, "test"]
    rng = random.Random(0)
    for example in task.examples[:50]:
        actions = [rng.choice(SOME_ACTIONS) for _ in range(8)] + task.expert_actions(example)
        first = play(fresh_example(task, example), actions)
        assert play(fresh_example(task, example), actions) == first      # a retry: same instance, same replies
        env = task.env(example)
        play(env, actions[:3])
        assert play(env, actions) == first                              # reset() really restarts
        assert example.question == "\n".join(first[0])                 # the question is what reset shows
    again = load_task(name, split="test", seed=0, **({"n": 300} if name == "gridworld" else {}))
    assert [e.id for e in again.examples] == [e.id for e in task.examples]
    other = load_task(name, split="test", seed=1, **({"n": 300} if name == "gridworld" else {}))
    assert [e.id for e in other.examples] != [e.id for e in task.examples]


@pytest.mark.parametrize("name, knobs", [("gridworld", {"n": 300}), ("gridworld", {"size": 3}),
                                         ("gridworld", {"size": 5, "walls": 4, "holes": 3, "n": 200}),
                                         ("guess", {}), ("guess", {"max_number": 50, "hints": "plain"}),
                                         ("boxes", {}), ("boxes", {"boxes": 6, "tries": 3, "notes": 1})])
def test_train_and_test_are_disjoint(name, knobs):
    train = {e.id for seed in (0, 1) for e in load_task(name, split="train", seed=seed, **knobs).examples}
    test = {e.id for seed in (0, 1) for e in load_task(name, split="test", seed=seed, **knobs).examples}
    assert train and test and not train & test
    assert all(split_of(i) == "train" for i in train) and all(split_of(i) == "test" for i in test)
    assert all(i.startswith(f"{name}:") for i in train | test)


def test_small_spaces_are_enumerated_whole():
    # size 3: every solvable map of the split exists once, so n defaults to what exists (< DEFAULT_SIZE)
    train = load_task("gridworld", split="train", size=3, walls=1, holes=1)
    test = load_task("gridworld", split="test", size=3, walls=1, holes=1)
    assert len({e.id for e in train.examples}) == len(train.examples) < 5000
    with pytest.raises(ValueError, match="ask for fewer"):
        load_task("gridworld", split="test", size=3, walls=1, holes=1, n=len(test.examples) + 1)
    with pytest.raises(ValueError, match="ask for fewer"):
        load_task("guess", split="test", n=153)


def check_expert(task, example):
    env = task.env(example)
    env.reset()
    actions = task.expert_actions(example)
    assert actions and all(isinstance(a, str) and 0 < len(a) <= 5 for a in actions)
    for i, action in enumerate(actions):
        observation, reward, done = env.step(action)
        last = i == len(actions) - 1
        assert (reward, done) == ((1.0, True) if last else (0.0, False)), (example.id, actions, observation)
    # the trainer ends an episode on TRAINER_REPEAT_LIMIT identical actions unless the last one finishes it
    runs = [actions[i:i + TRAINER_REPEAT_LIMIT] for i in range(len(actions) - TRAINER_REPEAT_LIMIT)]
    assert not any(len(set(run)) == 1 for run in runs), actions


@pytest.mark.parametrize("name, knobs", [("gridworld", {"n": 300}), ("gridworld", {"size": 3}),
                                         ("gridworld", {"size": 6, "walls": 6, "holes": 6, "max_moves": 12, "n": 300}),
                                         ("gridworld", {"size": 3, "walls": 0, "holes": 3}),
                                         ("guess", {}), ("guess", {"max_guesses": 3, "hints": "plain"}),
                                         ("guess", {"max_number": 100, "max_guesses": 7, "n": 300})])
def test_expert_solves_every_instance(name, knobs):
    """Every instance of small spaces (n left out: all of them), a few hundred of the larger ones."""
    for split in ("train", "test"):
        task = load_task(name, split=split, seed=0, **knobs)
        for example in task.examples:
            check_expert(task, example)
            if name == "gridworld":
                assert example.answer == " ".join(task.expert_actions(example))
                assert 2 <= len(task.expert_actions(example)) <= task.max_moves
            else:
                assert example.answer == task.expert_actions(example)[-1] == str(example.meta["secret"])


def test_gridworld_expert_is_shortest(tasks):
    """The expert's length equals a plain BFS's shortest path whenever that path needs no 3-move run."""
    from collections import deque
    for example in tasks["gridworld", "train"].examples:
        grid, start = example.meta["grid"], tuple(example.meta["start"])
        dist, queue = {start: 0}, deque([start])
        while queue:
            r, c = queue.popleft()
            for dr, dc in GRIDWORLD_MOVES.values():
                cell = (r + dr, c + dc)
                if 0 <= cell[0] < len(grid) and 0 <= cell[1] < len(grid) and grid[cell[0]][cell[1]] not in "#O" \
                        and cell not in dist:
                    dist[cell] = dist[r, c] + 1
                    queue.append(cell)
        goal = next((r, row.index("G")) for r, row in enumerate(grid) if "G" in row)
        assert dist[goal] <= len(example.meta["moves"]) <= dist[goal] + 2


GRID = Example("gridworld:@.#./.O../..#./O..G", "", "down right ...",
               {"grid": ["..#.", ".O..", "..#.", "O..G"], "start": [0, 0]})


def test_gridworld_mistakes_are_visible():
    env = GridworldEnv(GRID, max_moves=16)
    assert env.reset() == ("Move @ to G. O is a hole, # a wall. Reply up, down, left or right.",
                           "You are at row 1, column 1.\n@.#.\n.O..\n..#.\nO..G")
    assert env.step("right") == ("You moved right to row 1, column 2.\n.@#.\n.O..\n..#.\nO..G", 0.0, False)
    assert env.step("right") == ("A wall blocks right; you stay at row 1, column 2.\n.@#.\n.O..\n..#.\nO..G", 0.0, False)
    assert env.step("up") == ("The edge blocks up; you stay at row 1, column 2.\n.@#.\n.O..\n..#.\nO..G", 0.0, False)
    assert env.step("jump") == ("Invalid move; say up, down, left or right. You stay at row 1, column 2.\n"
                                ".@#.\n.O..\n..#.\nO..G", 0.0, False)
    assert env.step("down") == ("You fell into the hole at row 2, column 2. Game over.\n..#.\n.@..\n..#.\nO..G",
                                0.0, True)
    assert env.step("left") == (GAME_OVER, 0.0, True)     # done stays done, the reward stays the last one
    env.reset()
    replies = [env.step(a) for a in ["down", "down", "right", "down", "right", "right"]]
    assert replies[-1] == ("You reached the goal at row 4, column 4!", 1.0, True)
    assert [r[1:] for r in replies[:-1]] == [(0.0, False)] * 5
    assert env.step("up") == (GAME_OVER, 1.0, True)


def test_gridworld_reads_the_first_word_or_the_box():
    env = GridworldEnv(GRID, max_moves=16)
    for action in ["down", "DOWN", "Down.", " down please", "\\boxed{down}", "I go \\boxed{Down}",
                   "<think>up? no</think>\n\ndown", "1. down"]:
        env.reset()
        assert env.step(action)[0].startswith("You moved down"), action
    for action in ["downward", "go down", "d", "", "<think>down", "ｄｏｗｎ", "\\boxed{}", "\\boxed{jump} down"]:
        env.reset()
        assert env.step(action)[0].startswith("Invalid move"), action
    env.reset()
    assert env.step("x" * MAX_ACTION_CHARS + " down")[0].startswith("Invalid move")  # no box: the text is cut


REASONING = "Let me think about it step by step before I answer. " * 5   # over MAX_ACTION_CHARS


def test_a_box_is_read_wherever_it_is():
    """The last complete \\boxed{} of the visible text is read however long the text before it (a later box
    that never closes or holds over MAX_ACTION_CHARS characters is passed over), \\text{} and the like unwrapped,
    nested too; without one only the first MAX_ACTION_CHARS characters are read. The repeat key reads the same."""
    assert len(REASONING) > MAX_ACTION_CHARS
    envs = {"down": GridworldEnv(GRID, max_moves=16), "14": GuessEnv(GUESS, max_guesses=6, hints="range"),
            "3": BoxesEnv(BOXES, tries=9)}
    right = {"down": "You moved down", "14": "14 is right!", "3": "You found the key"}
    for word, env in envs.items():
        for action in [REASONING + f"\\boxed{{{word}}}", f"\\boxed{{\\text{{{word}}}}}",
                       f"\\boxed{{\\textbf{{{word}}}}}", REASONING + f"So: \\boxed{{\\mathrm{{{word}}}}}.",
                       f"\\boxed{{\\text{{\\textbf{{ {word} }}}}}}", f"I say \\boxed{{{word}}} and not \\boxed{{",
                       f"\\boxed{{{word}}} then \\boxed{{{'9' * (MAX_ACTION_CHARS + 50)}}}"]:
            env.reset()
            assert env.step(action)[0].startswith(right[word]), (word, action[-30:])
            assert env.action_key(action) == env.action_key(word), action[-30:]
        env.reset()
        assert not env.step(REASONING + word)[0].startswith(right[word])   # beyond the cut, no box
        assert env.action_key(REASONING + word) != env.action_key(word)


def test_the_boxes_tried_are_bounded():
    """At most MAX_BOXES_TRIED boxes are tried from the end: a complete box just within them is read, one past
    them is not (the start of the text is read), so 10 MB of unclosed boxes cost little."""
    env = GridworldEnv(GRID, max_moves=16)
    env.reset()
    assert env.step("\\boxed{down}" + "\\boxed{" * (MAX_BOXES_TRIED - 1))[0].startswith("You moved down")
    env.reset()
    assert env.step("\\boxed{down}" + "\\boxed{" * 1_500_000)[0].startswith("Invalid move")


@pytest.mark.parametrize("name", ENV_TASKS)
def test_actions_with_one_key_are_one_command(tasks, name):
    """SPEC §1's repeat rule compares Environment.action_key: actions with equal keys are the same command (the
    same answer from the same state), and the spellings a policy varies for one command share a key."""
    task = tasks[(name, "train")]
    env = task.env(task.examples[0])
    same = {"gridworld": ["down", "Down.", " down please", "\\boxed{down}", "<think>up?</think>\n\ndown"],
            "guess": ["10", "Guess 10", "10.", "I guess 10.", "\\boxed{010}"],
            "boxes": ["3", "box 3", "Open box 3.", "\\boxed{3}"]}[name]
    actions = SOME_ACTIONS + same
    outcome = {a: (env.reset(), env.step(a))[1] for a in actions}
    for a in actions:
        for b in actions:
            if env.action_key(a) == env.action_key(b):
                assert outcome[a] == outcome[b], (a, b)
    assert len({env.action_key(a) for a in same}) == 1, [env.action_key(a) for a in same]
    assert len({env.action_key(a) for a in actions}) > 3   # not one key for everything


def test_gridworld_out_of_moves():
    env = GridworldEnv(GRID, max_moves=3)
    env.reset()
    assert env.step("right")[1:] == (0.0, False)
    assert env.step("left")[1:] == (0.0, False)
    observation, reward, done = env.step("up")
    assert (reward, done) == (0.0, True) and observation.startswith("The edge blocks up; you stay at row 1, "
                                                                    "column 1. Out of moves.\n@.#.")
    env.reset()                                            # a fresh start has all its moves again
    assert env.step("right")[2] is False


GUESS = Example("guess:5-20:14", "", "14", {"low": 5, "high": 20, "secret": 14})


def test_guess_mistakes_are_visible():
    env = GuessEnv(GUESS, max_guesses=6, hints="range")
    assert env.reset() == ("Guess my number in 6 tries. Reply with one number.", "It is from 5 to 20.")
    assert env.step("12") == ("12 is too low. It is from 13 to 20.", 0.0, False)
    assert env.step("I guess 17.") == ("17 is too high. It is from 13 to 16.", 0.0, False)
    assert env.step("hi") == ("No number; reply with one number. It is from 13 to 16.", 0.0, False)
    assert env.step("1 2") == ("Several numbers; reply with one. It is from 13 to 16.", 0.0, False)
    assert env.step("25") == ("25 is outside 5 to 20. It is from 13 to 16.", 0.0, False)
    assert env.step("\\boxed{14}") == ("14 is right!", 1.0, True)
    assert env.step("14") == (GAME_OVER, 1.0, True)
    env.reset()
    assert env.step("9") == ("9 is too low. It is from 10 to 20.", 0.0, False)
    assert env.step("6") == ("6 is too low. It is from 10 to 20.", 0.0, False)   # a useless guess keeps the range


def test_guess_retry_expert_searches_the_critique_range():
    """The warm start's retry target after "It is from a to b.": the binary search (lower midpoint) within
    that range, which holds the secret 14 of [5, 20]; a tip without a range, or one that misses the secret,
    gets the expert's search of the whole range."""
    task = load_task("guess", n=1)
    assert task.retry_expert_actions(GUESS, "It is from 13 to 16.") == ["14"]             # (13 + 16) // 2
    assert task.retry_expert_actions(GUESS, "It is from 10 to 20.") == ["15", "12", "13", "14"]
    assert task.retry_expert_actions(GUESS, "It is from 1 to 30.") == ["12", "16", "14"]  # cut to [5, 20]
    whole = task.expert_actions(GUESS)
    assert whole == ["12", "16", "14"]
    assert task.retry_expert_actions(GUESS, "It is from 15 to 16.") == whole              # 14 is not in it
    assert task.retry_expert_actions(GUESS, "Try lower.") == whole
    env = GuessEnv(GUESS, max_guesses=6, hints="range")
    env.reset()
    assert [env.step(a)[1] for a in ["15", "12", "13", "14"]] == [0.0, 0.0, 0.0, 1.0]


def test_guess_plain_hints_and_no_tries_left():
    env = GuessEnv(GUESS, max_guesses=3, hints="plain")
    assert env.reset() == ("Guess my number in 3 tries. Reply with one number.", "It is from 5 to 20.")
    assert env.step("12") == ("12 is too low.", 0.0, False)
    assert env.step("-3") == ("-3 is outside 5 to 20.", 0.0, False)
    assert env.step("15") == ("15 is too high. No tries left.", 0.0, True)      # the secret is never revealed
    assert env.step("14") == (GAME_OVER, 0.0, True)
    env.reset()
    assert env.step("99999999999999999999") == ("That number is outside 5 to 20.", 0.0, False)
    assert env.step("<think>12?</think>\n\n14")[1:] == (1.0, True)


HOSTILE = ["x" * 1_000_000, "up " * 400_000, "\\boxed{" * 150_000, "{" * 1_000_000, "}" * 1_000_000,
           "</think>" * 130_000, "<think>" + "right " * 200_000, "9" * 1_000_000, "-" * 1_000_000,
           "1 " * 500_000, "\\boxed{right}" * 80_000, "é🙂ｕｐ٣" * 200_000, "<|im_end|>", "<|im_start|>user\nup",
           "<|endoftext|>", "\x00\x01\x7f", "\n" * 1000, "\\boxed{\\boxed{right}}", "\ud800", "right\u200b",
           "٣", "１２"]


@pytest.mark.parametrize("name", ENV_TASKS)
def test_hostile_actions_are_quick_and_never_raise(tasks, name):
    task = tasks[name, "train"]
    env = task.env(task.examples[0])
    for action in HOSTILE:
        env.reset()
        start = time.perf_counter()
        observation, reward, done = env.step(action)
        assert time.perf_counter() - start < 0.05, action[:20]
        assert isinstance(observation, str) and isinstance(reward, float) and isinstance(done, bool)
        assert 0.0 <= reward <= 1.0 and len(observation) < 200
        assert "<|" not in observation and "\ud800" not in observation   # the action is never echoed raw


@pytest.mark.parametrize("name", ENV_TASKS)
def test_random_play_rewards_done_and_short_texts(tasks, name):
    """Random policies: rewards in [0, 1], reward 1 only on done, episodes end within the env's own cap,
    and every text is short printable ASCII (one character-model token per character)."""
    task = tasks[name, "test"]
    cap = task.max_turns
    rng = random.Random(1)
    for example in task.examples[:100]:
        env = task.env(example)
        task_text, first = env.reset()
        texts = [task_text, first]
        assert len(task_text) <= 70 and len(first) <= 50
        for turn in range(1, cap + 2):
            observation, reward, done = env.step(rng.choice(SOME_ACTIONS + task.expert_actions(example)))
            assert reward in (0.0, 1.0) and (reward == 0.0 or done)
            assert len(observation) <= 110
            texts.append(observation)
            if done:
                break
        assert done and turn <= cap
        assert set("".join(texts)) <= set(CHAR_ALPHABET)


@pytest.mark.parametrize("name, knobs, knob", [
    ("gridworld", {"size": 2}, "size"), ("gridworld", {"size": 10}, "size"), ("gridworld", {"size": "big"}, "size"),
    ("gridworld", {"size": True}, "size"), ("gridworld", {"walls": -1}, "walls"),
    ("gridworld", {"size": 3, "walls": 5, "holes": 3}, "holes"), ("gridworld", {"max_moves": 1}, "max_moves"),
    ("gridworld", {"n": 0}, "n"), ("gridworld", {"colour": 3}, "colour"),
    ("guess", {"max_number": 1}, "max_number"), ("guess", {"max_number": 101}, "max_number"),
    ("guess", {"max_guesses": 0}, "max_guesses"), ("guess", {"max_guesses": "six"}, "max_guesses"),
    ("guess", {"hints": "loud"}, "hints"), ("guess", {"n": -1}, "n"), ("guess", {"digits": 2}, "digits"),
    ("boxes", {"boxes": 1}, "boxes"), ("boxes", {"boxes": 10}, "boxes"), ("boxes", {"tries": 0}, "tries"),
    ("boxes", {"notes": 4}, "notes"), ("boxes", {"boxes": 3, "notes": 3}, "notes"), ("boxes", {"keys": 2}, "keys")])
def test_knob_errors_name_the_knob(name, knobs, knob):
    with pytest.raises(ValueError, match=f"{name}.*{knob}"):
        load_task(name, split="train", **knobs)


def test_knobs_from_the_command_line():
    knobs = parse_knobs(["size=3", "walls=1", "holes=1", "max_moves=8"])
    assert len(load_task("gridworld", split="test", **knobs).examples) > 0
    task = load_task("guess", split="test", **parse_knobs(["max_number=30", "hints=plain", "max_guesses=5"]))
    assert task.env(task.examples[0]).reset()[0] == "Guess my number in 5 tries. Reply with one number."
    with pytest.raises(ValueError, match="size"):
        load_task("gridworld", **parse_knobs(["size=four"]))


BOXES = Example("boxes:1,4,3,5:3:4,5", "", "3", {"boxes": [1, 4, 3, 5], "key": 3, "notes": [4, 5]})


def test_boxes_mistakes_are_visible():
    """The docstring's example, step by step, and what ends an episode."""
    env = BoxesEnv(BOXES, tries=9)
    assert env.reset() == ("Find the key in 9 tries: reply with the number of a box to open.", "The boxes are 1, 4, 3, 5.")
    assert env.step("1") == ("Box 1 is empty.", 0.0, False)
    assert env.step("Open box 4.") == ("Box 4 has no key. A note says the key is in box 3.", 0.0, False)
    assert env.step("8") == ("There is no box 8.", 0.0, False)
    assert env.step("hi") == env.step("4 or 5") == ("Reply with one box number.", 0.0, False)
    assert env.step("\\boxed{3}") == ("You found the key in box 3!", 1.0, True)
    assert env.step("3") == (GAME_OVER, 1.0, True)
    env = BoxesEnv(BOXES, tries=2)
    env.reset()
    assert env.step("1") == ("Box 1 is empty.", 0.0, False)
    assert env.step("5") == ("Box 5 has no key. A note says the key is in box 3. No tries left.", 0.0, True)
    assert env.step("3") == (GAME_OVER, 0.0, True)                 # the note came on the last try


def play_reward(task, example, actions):
    env = task.env(example)
    env.reset()
    for action in actions:
        _, reward, done = env.step(action)
        if done:
            return reward
    return 0.0


def test_boxes_best_play_fails_only_where_a_note_came_too_late(tasks):
    """The expert without rng (best play: in order, following the first note) wins on the 5/6 the docstring
    says, and every instance it loses has the empty box first and a note second; there the warm start's
    critique is that note and its retry opens the key at once."""
    task = tasks["boxes", "test"]
    lost = []
    for example in task.examples:
        labels, key, notes = example.meta["boxes"], example.meta["key"], example.meta["notes"]
        actions = task.expert_actions(example)
        assert actions[0] == str(labels[0]) and len(actions) <= task.tries
        if play_reward(task, example, actions) == 0.0:
            lost.append(example)
            assert labels[0] not in notes + [key] and labels[1] in notes, example.id
            env = task.env(example)
            env.reset()
            observations = [env.step(action)[0] for action in actions]
            critique = task.warm_start_critique(example, actions, observations)
            assert critique == f"A note says the key is in box {key}."
            assert task.retry_expert_actions(example, critique) == [str(key)]
            assert play_reward(task, example, [str(key)]) == 1.0
        else:
            assert labels[0] in notes + [key] or labels[1] == key, example.id
    assert abs(len(lost) / len(task.examples) - 1 / 6) < 0.05
    assert task.warm_start_critique(BOXES, ["8", "9"], ["There is no box 8.", "There is no box 9."]) == "Read the notes."
    # no note, or one that names another box: the retry plays best (here it reads box 4's note too late)
    assert task.retry_expert_actions(BOXES, "Read the notes.") == ["1", "4"]
    assert task.retry_expert_actions(BOXES, "A note says the key is in box 5.") == ["1", "4"]


def test_boxes_warm_start_expert_reads_a_note_by_chance():
    """With the warm start's rng the expert follows a note with probability BOXES_EXPERT_READS on every draw,
    the same instance included, and is reproducible from the seed."""
    task = load_task("boxes", split="train", n=1)
    note_first = Example("boxes:4,1,3,5:3:4,5", "", "3", {"boxes": [4, 1, 3, 5], "key": 3, "notes": [4, 5]})
    rng = random.Random(0)
    draws = [task.expert_actions(note_first, rng) for _ in range(2000)]
    assert set(map(tuple, draws)) == {("4", "3"), ("4", "1")}
    assert abs(draws.count(["4", "3"]) / len(draws) - BOXES_EXPERT_READS) < 0.03
    assert draws == [task.expert_actions(note_first, r) for r in [random.Random(0)] for _ in range(2000)]
    assert task.expert_actions(note_first) == ["4", "3"]          # best play always reads
