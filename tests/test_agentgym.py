"""The AgentGym client (data.AgentGymTask) against small AgentGym-protocol servers started in the test.

`FakeAgentGym(flavor)` serves a deterministic "say the secret word" game on 127.0.0.1 (port 0) through
one environment's real field names and reply shapes (AGENTGYM.md): alfworld, webshop, sciworld, searchqa,
or the authors' unified fork. Task id n's secret word is WORDS[n % len(WORDS)]; the first observation
shows it; sending it wins (reward 1). Requests with other field names are answered 422, as FastAPI would.
Faults are injected per path: "close" (drop the connection without a reply), "error" (the flavor's error:
HTTP 200 {"error": ...} or HTTP 500), ("sleep", seconds), ("trickle", seconds: the reply one byte at a
time, this long apart), ("raw", bytes: this HTTP 200 body instead of the reply), ("short", bytes: that body,
its Content-Length 10 bytes more, then the connection closed), and `dead` closes every connection.
`one_at_a_time=True` answers one request at a time, as a real server does (AGENTGYM.md).
"""
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import icrl
from data import (AGENTGYM_INSTRUCTIONS, AGENTGYM_MAX_REPLY_BYTES, AgentGymPool, AgentGymTask, load_task, parse_knobs,
                  read_agentgym_ids)

WORDS = ("apple", "river", "stone", "cloud")
ERROR_IS_500 = {"alfworld": False, "sciworld": False, "webshop": True, "searchqa": True, "unified": True}


class FakeAgentGym:
    def __init__(self, flavor: str, step_cap: int = 50, one_at_a_time: bool = False):
        self.flavor, self.step_cap = flavor, step_cap
        self.one_at_a_time = threading.Lock() if one_at_a_time else None
        self.instances = {}        # instance id -> {"task", "steps", "done", "score", "observation"}
        self.calls = []            # (path, body or query) of every request answered or failed
        self.faults = {}           # path -> list of faults, consumed one per request
        self.always = {}           # path -> a fault for every request
        self.dead = False
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0   # requests being answered at once
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                fake.serve(self, parsed.path, dict(urllib.parse.parse_qsl(parsed.query)))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = "not json"
                fake.serve(self, urllib.parse.urlsplit(self.path).path, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None   # a client that gave up is not worth a traceback
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, path):
        return sum(p == path for p, _ in self.calls)

    def actions(self):
        return [body["action"] for path, body in self.calls if path == "/step"]

    # --- HTTP ---------------------------------------------------------------------------------------

    def serve(self, handler, path, payload):
        if self.one_at_a_time:
            with self.one_at_a_time:
                self.count_in_flight(handler, path, payload)
        else:
            self.count_in_flight(handler, path, payload)

    def count_in_flight(self, handler, path, payload):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.answer_request(handler, path, payload)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer_request(self, handler, path, payload):
        with self.lock:
            self.calls.append((path, payload))
            fault = self.faults[path].pop(0) if self.faults.get(path) else self.always.get(path)
            if self.dead:
                fault = "close"
        if isinstance(fault, tuple) and fault[0] == "sleep":
            time.sleep(fault[1])
            fault = None
        if fault == "close":
            handler.close_connection = True   # no status line: the client sees the connection closed
            return
        if fault == "error":
            status, reply = (500, {"detail": "boom"}) if ERROR_IS_500[self.flavor] else (200, {"error": "boom"})
        else:
            with self.lock:
                status, reply = self.answer(path, payload)
        data = fault[1] if isinstance(fault, tuple) and fault[0] in ("raw", "short") else json.dumps(reply).encode()
        promised = len(data) + (10 if isinstance(fault, tuple) and fault[0] == "short" else 0)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(promised))
            handler.end_headers()
            if isinstance(fault, tuple) and fault[0] == "trickle":
                for i in range(len(data)):
                    handler.wfile.write(data[i:i + 1])
                    handler.wfile.flush()
                    time.sleep(fault[1])
            else:
                handler.wfile.write(data)
        except OSError:
            pass

    # --- the game, in each flavor's field names ----------------------------------------------------

    def fields(self):
        """(instance id field, reset task field, /step observation key)."""
        return {"alfworld": ("id", "game", "observation"), "sciworld": ("id", "data_idx", "observation"),
                "webshop": ("env_idx", "session_id", "state"), "searchqa": ("env_idx", "id", "observation"),
                "unified": ("env_id", "task_id", "observation")}[self.flavor]

    def error(self, message):
        return (500, {"detail": message}) if ERROR_IS_500[self.flavor] else (200, {"error": message})

    def answer(self, path, payload):
        id_field, task_field, obs_key = self.fields()
        if path == "/create":
            if self.flavor == "searchqa" and not (isinstance(payload, dict) and "id" in payload):
                return 422, {"detail": "field required: id"}
            new = 1000 + len(self.instances) if self.flavor == "webshop" else len(self.instances)
            self.instances[new] = None
            return 200, ({"id": new} if self.flavor in ("alfworld", "sciworld") else
                         {"env_id": new} if self.flavor == "unified" else new)
        if path == "/observation":
            if set(payload) != {id_field}:
                return 422, {"detail": f"expected ?{id_field}="}
            state = self.instances.get(int(payload[id_field]))
            return (200, state["observation"]) if state else self.error("unknown id")
        if not isinstance(payload, dict) or id_field not in payload:
            return 422, {"detail": f"field required: {id_field}"}
        instance = payload[id_field]
        if instance not in self.instances:
            return self.error(f"The id {instance} is not valid.")
        if path == "/reset":
            expected = {id_field, task_field} | ({"world_type"} if self.flavor == "alfworld" else set())
            if set(payload) != expected or (self.flavor == "alfworld" and payload["world_type"] != "Text"):
                return 422, {"detail": f"expected fields {sorted(expected)}"}
            word = WORDS[payload[task_field] % len(WORDS)]
            state = self.instances[instance] = dict(task=payload[task_field], word=word, steps=0, done=False, score=0,
                                                    observation=f"You are in a room. Your task is to: say the secret word {word}.")
            if self.flavor == "alfworld":
                return 200, {"id": instance, "observation": state["observation"],
                             "available_actions": list(WORDS) + ["look"], "task_type": "secret"}
            if self.flavor == "sciworld":
                return 200, {"task_description": "Your task is to say the secret word.", "observation": f"The word is {word}.",
                             "reward": 0, "score": 0, "done": False}
            if self.flavor == "webshop":
                state["observation"] = f"WebShop [SEP] Instruction: [SEP] say the secret word {word} [SEP] Search"
                return 200, [state["observation"], None]
            if self.flavor == "searchqa":
                return 200, f"Answer with <answer></answer>. Question: what is the secret word? ({word})"
            return 200, {"observation": state["observation"], "info": {"available_actions": list(WORDS)}}
        if path == "/step":
            if set(payload) != {id_field, "action"}:
                return 422, {"detail": "expected fields id and action"}
            state = self.instances[instance]
            if state is None:
                return self.error("not reset")
            if state["done"]:
                return self.error(f"The task with environment {instance} has finished.")
            state["steps"] += 1
            action, word = payload["action"], state["word"]
            won = f"<answer>{word}</answer>" in action if self.flavor == "searchqa" else action == word
            if self.flavor == "sciworld":
                state["score"] = 100 if won else 30 if action == "hint" else -100 if action == "fail" else state["score"]
                state["done"] = won or action == "fail"
            else:
                state["done"] = won
            observation = "You win." if won else f"The secret word is {word}." if action == "look" else "Nothing happens."
            if state["steps"] >= self.step_cap:
                state["done"] = True   # alfworld's own step cap: done, not won
            reply = {obs_key: observation, "reward": 1.0 if won else 0.0, "done": state["done"]}
            if self.flavor == "sciworld":
                reply["score"] = state["score"]
            elif self.flavor == "alfworld":
                reply["available_actions"] = list(WORDS) + ["look"]
            else:
                reply["info"] = None
            return 200, reply
        if path == "/close":
            if self.flavor not in ("sciworld", "searchqa", "unified"):
                return 404, {"detail": "Not Found"}
            del self.instances[instance]
            return 200, True
        return 404, {"detail": "Not Found"}


@pytest.fixture
def servers(tmp_path):
    started = []
    ids = tmp_path / "ids.txt"   # webshop and sciworld take their ids from a file
    ids.write_text("".join(f"{i}\n" for i in range(8)))

    def start(flavor, count=1, **kw):
        fakes = [FakeAgentGym(flavor, **kw) for _ in range(count)]
        for fake in fakes:
            fake.ids = str(ids)
        started.extend(fakes)
        return fakes

    yield start
    for fake in started:
        fake.stop()


def task_on(fakes, env=None, **knobs):
    flavor = fakes[0].flavor
    if flavor == "unified":
        knobs.setdefault("protocol", "unified")
    env = env or ("alfworld" if flavor == "unified" else flavor)
    if env in ("webshop", "sciworld"):
        knobs.setdefault("path", fakes[0].ids)
    if env == "searchqa":   # ids 0..7, not its 169,615 train ids
        knobs.update(split="test", n=8)
    return load_task(f"agentgym:{env}", env_url=",".join(f.url for f in fakes), **knobs)


WIN = {"alfworld": "Thought: the word is shown.\nAction: apple", "webshop": "Action:\napple\n",
       "sciworld": "Thought: say it\nAction: apple", "searchqa": "It is <answer>apple</answer>",
       "unified": "<think>Action: river</think>\n\nThought: ok\nAction: apple"}
LOSE = {"alfworld": "Action: look", "webshop": "Action: look", "sciworld": "Action: look",
        "searchqa": "<search>secret</search>", "unified": "Action: look"}


@pytest.mark.parametrize("flavor", ["alfworld", "webshop", "sciworld", "searchqa", "unified"])
def test_whole_episode_through_each_protocol(servers, flavor):
    fake, = servers(flavor)
    task = task_on([fake])
    env_name = "alfworld" if flavor == "unified" else flavor
    env = task.env(task.examples[0])   # task id 0: "apple"
    task_text, first = env.reset()
    instruction = AGENTGYM_INSTRUCTIONS[env_name]
    if env_name == "alfworld":
        assert task_text == instruction + "\nYou are in a room. Your task is to: say the secret word apple."
        assert first == "AVAILABLE ACTIONS: apple,river,stone,cloud" + (",look" if flavor == "alfworld" else "")
    elif flavor == "sciworld":
        assert (task_text, first) == (instruction, "Your task is to say the secret word.\nThe word is apple.")
    elif flavor == "webshop":
        assert (task_text, first) == (instruction, "WebShop [SEP] Instruction: [SEP] say the secret word apple [SEP] Search")
    else:
        assert (task_text, first) == (instruction, "Answer with <answer></answer>. Question: what is the secret word? (apple)")
    observation, reward, done = env.step(LOSE[flavor])
    assert (reward, done) == (0.0, False)
    assert observation == ("Nothing happens." if flavor == "searchqa" else "The secret word is apple.")
    assert env.step(WIN[flavor]) == ("You win.", 1.0, True)
    expected = [LOSE[flavor], WIN[flavor]] if flavor == "searchqa" else ["look", "apple"]
    assert fake.actions() == expected   # parsed actions (searchqa: the raw response)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("Action: apple")   # answered locally: the server is not asked
    env.close()
    # A retry is a fresh env of the same example: the same instance is reset again, nothing created
    retry = task.env(env.example)
    assert retry.reset() == (task_text, first)
    assert retry.step(WIN[flavor])[1:] == (1.0, True)
    retry.close()
    assert fake.count("/create") == 1 and fake.count("/reset") == 2


def test_pool_spreads_live_envs_over_servers_and_reuses_instances(servers):
    fakes = servers("alfworld", count=3)
    task = task_on(fakes)
    envs = [task.env(ex) for ex in task.examples[:4]]
    for env in envs:
        env.reset()
    assert [env.lease for env in envs] == [(0, 0), (1, 0), (2, 0), (0, 1)]   # 3 servers, then shared round-robin
    assert [f.count("/create") for f in fakes] == [2, 1, 1]
    assert task.pool.live() == [2, 1, 1]
    for env in envs:
        assert env.step("Action: " + WORDS[env.task_id % 4])[1:] == (1.0, True)
    for env in envs:
        env.close()
    assert task.pool.live() == [0, 0, 0]
    again = [task.env(ex) for ex in task.examples[4:7]]
    for env in again:
        env.reset()
    assert sorted(env.lease[0] for env in again) == [0, 1, 2]   # one per server again
    assert [f.count("/create") for f in fakes] == [2, 1, 1]       # the instances are reused
    for env in again:
        env.close()


def test_a_turn_calls_its_servers_at_once_and_each_server_one_call_at_a_time(servers):
    """A turn's resets and steps go to the servers together (threads), so a turn waits for its slowest server,
    not for the sum of all calls; a rank sends a server one request at a time, all a server answers
    (AGENTGYM.md). The replies come back in the episodes' order."""
    fakes = servers("alfworld", count=2)
    task = task_on(fakes)
    envs = [task.env(example) for example in task.examples[:4]]   # two episodes on each server
    in_flight = {"now": 0, "most": 0}   # requests being answered at once, over both servers
    lock = threading.Lock()
    for fake in fakes:
        fake.always["/reset"] = fake.always["/step"] = ("sleep", 0.1)
        answer = fake.answer_request

        def counted(*args, answer=answer):
            with lock:
                in_flight["now"] += 1
                in_flight["most"] = max(in_flight["most"], in_flight["now"])
            try:
                answer(*args)
            finally:
                with lock:
                    in_flight["now"] -= 1
        fake.answer_request = counted
    first = icrl.call_envs(envs, "reset", [()] * 4)
    assert in_flight["most"] == 2 and [fake.most_in_flight for fake in fakes] == [1, 1]
    one_by_one = [task.env(example) for example in task.examples[:4]]
    assert first == [env.reset() for env in one_by_one]
    for env in one_by_one:
        env.close()
    in_flight["most"] = 0
    replies = icrl.call_envs(envs, "step", [("Action: look",)] * 4)
    assert in_flight["most"] == 2 and [fake.most_in_flight for fake in fakes] == [1, 1]
    assert [reward for _, reward, _ in replies] == [0.0] * 4
    for env in envs:
        env.close()


def test_the_timeout_counts_the_servers_time_not_the_wait_behind_the_ranks_other_calls(servers):
    """Six episodes on one server that answers one request at a time, each reset 0.2 s with a 0.6 s timeout:
    all of them fit, one after another (1.2 s in all), however many of a turn's calls wait for that server."""
    fake, = servers("alfworld", one_at_a_time=True)
    task = task_on([fake], timeout=0.6)
    fake.always["/reset"] = ("sleep", 0.2)
    envs = [task.env(example) for example in task.examples[:6]]
    replies = icrl.call_envs(envs, "reset", [()] * 6)
    assert all(f"the secret word {WORDS[env.task_id % 4]}" in task_text for env, (task_text, _) in zip(envs, replies))
    assert fake.count("/create") == 6   # no call failed: no instance was recreated
    for env in envs:
        env.close()


def test_after_a_call_fails_for_good_the_calls_waiting_for_a_server_are_not_sent(servers):
    """A failure that stops the run (RuntimeError) is not followed by the other calls queued for the server,
    each of which would wait out its own timeouts: they raise the same error unsent."""
    fake, = servers("alfworld")
    task = task_on([fake], timeout=0.3)
    fake.always["/reset"] = ("sleep", 1.0)
    envs = [task.env(example) for example in task.examples[:6]]
    with pytest.raises(RuntimeError, match=r"/reset: no reply within 0.3 s \(after recreating the instance once"):
        icrl.call_envs(envs, "reset", [()] * 6)
    assert fake.count("/reset") == 2   # one episode's reset and its retry
    # start_over (after a failure that cost one held-out evaluation): the next episodes try the server again, on
    # fresh instances, with every lease the cut-short episodes held given back
    del fake.always["/reset"]
    task.start_over()
    fresh = [task.env(example) for example in task.examples[:2]]
    assert icrl.call_envs(fresh, "reset", [()] * 2)[0][1].startswith("AVAILABLE ACTIONS")
    assert task.pool.live() == [2]   # slots 0 and 1 again: nothing leaked by the episodes the failure cut short


def test_each_rank_plays_on_its_own_servers_when_they_divide_evenly(monkeypatch):
    """A server answers one request at a time (AGENTGYM.md): with servers in a multiple of the ranks, each rank
    takes as many of its own, so a server queues the calls of one rank only, which sends them one at a time, and
    every call's timeout measures the server's own time. Otherwise (fewer, or uneven: some servers would carry
    more than their share) the ranks share them, starting on different ones. Servers on 127.0.0.1 are the node's
    own, split among the node's ranks (LOCAL_RANK); others among all (RANK)."""
    urls = [f"http://127.0.0.1:{port}" for port in (1, 2, 3, 4)]
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "9")          # rank 1 of the second node
    monkeypatch.setenv("WORLD_SIZE", "16")
    pool = AgentGymPool(urls)
    assert [pool.urls[pool.acquire()[0]] for _ in range(3)] == [urls[1], urls[3], urls[1]]
    remote = [f"http://10.0.0.{k}:8000" for k in range(32)]
    assert AgentGymPool(remote).urls == remote[9::16]
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    pool = AgentGymPool(urls)   # 4 servers, 8 ranks: shared
    assert [pool.urls[pool.acquire()[0]] for _ in range(5)] == [urls[1], urls[2], urls[3], urls[0], urls[1]]
    assert AgentGymPool(urls * 3).urls == urls * 3   # 12 servers, 8 ranks: uneven, shared
    other = [u.replace("127.0.0.1", "127.0.0.2") for u in urls] * 2   # 127.0.0.2 is loopback too: the node's 8
    assert AgentGymPool(other).urls == other[3::8]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")   # a launcher that sets no local pair: the global one (rank 9 of 16)
    assert AgentGymPool(urls * 4).urls == (urls * 4)[9::16]


def test_a_dropped_step_recreates_the_instance_and_replays_the_episode(servers):
    fake, = servers("alfworld")
    task = task_on([fake])
    env = task.env(task.examples[1])   # "river"
    env.reset()
    assert env.step("Action: look")[1:] == (0.0, False)
    assert env.step("Action: stone")[1:] == (0.0, False)
    fake.faults["/step"] = ["close"]
    assert env.step("Action: river") == ("You win.", 1.0, True)
    assert fake.count("/create") == 2
    assert fake.actions() == ["look", "stone", "river", "look", "stone", "river"]
    assert fake.instances[1]["done"] and fake.instances[1]["steps"] == 3   # the fresh instance played it all
    env.close()
    fake.faults["/reset"] = ["error"]   # a failed reset: recreated once, then it works
    env = task.env(task.examples[2])
    assert env.reset()[1].startswith("AVAILABLE ACTIONS")
    assert fake.count("/create") == 3


@pytest.mark.parametrize("how", ["drop", "stop"])
def test_a_server_that_dies_mid_episode_raises_naming_server_and_call(servers, how):
    fake, = servers("alfworld")
    task = AgentGymTask("alfworld", env_url=fake.url + "/", timeout=5)
    env = task.env(task.examples[0])
    env.reset()
    env.step("Action: look")
    if how == "drop":
        fake.dead = True
    else:
        fake.stop()
    with pytest.raises(RuntimeError) as e:
        env.step("Action: apple")
    message = str(e.value)
    assert "\n" not in message and fake.url in message
    assert f"POST {fake.url}/create" in message and f"POST {fake.url}/step" in message   # the retry, then the first failure
    if how == "drop":
        assert fake.count("/create") == 2   # recreated once, and only once


@pytest.mark.parametrize("flavor", ["alfworld", "webshop", "sciworld", "searchqa", "unified"])
def test_an_error_reply_recreates_once_then_raises(servers, flavor):
    fake, = servers(flavor)
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    fake.always["/step"] = "error"
    with pytest.raises(RuntimeError) as e:
        env.step("Action: look")
    message = str(e.value)
    assert f"POST {fake.url}/step" in message and "boom" in message and "recreating the instance once" in message
    assert ("HTTP 500" in message) == ERROR_IS_500[flavor]
    assert fake.count("/create") == 2 and fake.count("/step") == 2


@pytest.mark.parametrize("error", ["The task has finished.", True])
def test_an_error_key_fails_the_call_even_beside_the_expected_fields(servers, error):
    """AGENTGYM.md: an `error` key in an HTTP 200 reply is a failure, whatever else the reply holds; a reply
    with it and a well-formed observation must not be taken as a step (recreated once, then raised)."""
    fake, = servers("alfworld")
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    answer = fake.answer

    def with_error(path, payload):
        status, reply = answer(path, payload)
        return (status, dict(reply, error=error)) if path == "/step" else (status, reply)

    fake.answer = with_error
    with pytest.raises(RuntimeError, match=f"error '{error}'") as e:
        env.step("Action: apple")
    assert "recreating the instance once" in str(e.value) and fake.count("/step") == 2


@pytest.mark.parametrize("empty", [None, "", False, 0, [], {}])
def test_an_empty_error_key_is_no_error(servers, empty):
    """A server that always sends an `error` key, null, false, 0 or empty when all went well, is answered as
    usual."""
    fake, = servers("alfworld")
    answer = fake.answer

    def with_empty_error(path, payload):
        status, reply = answer(path, payload)
        return (status, dict(reply, error=empty)) if isinstance(reply, dict) else (status, reply)

    fake.answer = with_empty_error
    task = task_on([fake])
    env = task.env(task.examples[0])
    assert env.reset()[1].startswith("AVAILABLE ACTIONS")
    assert env.step("Action: apple") == ("You win.", 1.0, True)
    assert fake.count("/create") == 1


def test_timeouts(servers):
    fake, = servers("alfworld")
    task = task_on([fake], **parse_knobs(["timeout=0.5"]))   # from the command line: a string
    assert task.timeout == 0.5
    env = task.env(task.examples[0])
    env.reset()
    fake.always["/step"] = ("sleep", 2.0)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"/step: no reply within 0.5 s"):
        env.step("Action: apple")
    assert time.perf_counter() - start < 1.9   # two timed-out calls, nothing waits for the server's 2 s
    assert fake.count("/create") == 2


def test_the_timeout_bounds_the_whole_call(servers):
    """A server that trickles its reply, each byte well within the timeout, is cut off at the timeout: the
    call fails (recreated once, then raised), long before the reply would be complete."""
    fake, = servers("alfworld")
    task = task_on([fake], timeout=0.5)
    env = task.env(task.examples[0])
    env.reset()
    fake.always["/step"] = ("trickle", 0.05)   # about 150 bytes: 7 s a reply
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"/step: no reply within 0.5 s"):
        env.step("Action: apple")
    assert time.perf_counter() - start < 2.5 and fake.count("/create") == 2


def test_an_oversized_reply_is_a_failed_call(servers):
    fake, = servers("alfworld")
    task = task_on([fake], timeout=5)
    env = task.env(task.examples[0])
    env.reset()
    huge = json.dumps({"observation": "x" * AGENTGYM_MAX_REPLY_BYTES, "reward": 0, "done": False}).encode()
    fake.always["/step"] = ("raw", huge)
    with pytest.raises(RuntimeError, match=rf"/step: reply over {AGENTGYM_MAX_REPLY_BYTES} bytes") as e:
        env.step("Action: apple")
    assert "\n" not in str(e.value) and fake.count("/create") == 2


@pytest.mark.parametrize("flavor, path, body", [("alfworld", "/step", b'{"observation": "o", "reward": 1, "done": true}'),
                                                ("webshop", "/create", b"12")])
def test_a_reply_shorter_than_its_content_length_is_a_failed_call(servers, flavor, path, body):
    """A connection closed before the whole body came is a failed call, even when the part that came is JSON."""
    fake, = servers(flavor)
    task = task_on([fake])
    env = task.env(task.examples[0])
    fake.always[path] = ("short", body)
    with pytest.raises(RuntimeError, match=f"{path}: reply shorter than its Content-Length") as e:
        env.reset()
        env.step(WIN[flavor])
    assert "\n" not in str(e.value) and "recreating the instance once" in str(e.value)


def test_malformed_replies_are_failures(servers):
    fake, = servers("alfworld")
    task = task_on([fake])
    env = task.env(task.examples[0])
    fake.faults["/reset"] = ["close"]
    env.reset()
    original = fake.answer
    fake.answer = lambda path, payload: (200, {"nothing": 1}) if path == "/step" else original(path, payload)
    with pytest.raises(RuntimeError, match=r"/step: unexpected reply"):
        env.step("Action: apple")


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                                   # too deep for the parser
    b'{"observation": "o", "reward": Infinity, "done": true}',         # not a number a reward can be
    b'{"observation": "o", "reward": NaN, "done": true}',
    b'{"observation": "o", "reward": 1e400, "done": true}',
    b'{"observation": "o", "reward": 1' + b"0" * 400 + b', "done": true}',
    b'{"observation": "o", "reward": 0, "done": "false"}',             # "false" is no false
    b'{"observation": "o", "reward": 0, "done": 2}',
    b'{"observation": "o", "reward": 0, "done": null}',
    b'{"observation": "o", "reward": 0}',
], ids=["deep", "infinity", "nan", "1e400", "huge int", "done string", "done 2", "done null", "no done"])
def test_hostile_step_replies_are_failed_calls(servers, body):
    fake, = servers("alfworld")
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    fake.always["/step"] = ("raw", body)
    with pytest.raises(RuntimeError) as e:
        env.step("Action: apple")
    message = str(e.value)
    assert "\n" not in message and f"POST {fake.url}/step" in message and "recreating the instance once" in message


def test_done_may_be_zero_or_one(servers):
    fake, = servers("alfworld")
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    fake.faults["/step"] = [("raw", b'{"observation": "o", "reward": 0, "done": 0}'),
                            ("raw", b'{"observation": "p", "reward": 1, "done": 1}')]
    assert env.step("Action: look") == ("o", 0.0, False)
    assert env.step("Action: apple") == ("p", 1.0, True)


def test_sciworld_score_is_scaled_and_clamped(servers, tmp_path):
    fake, = servers("sciworld")
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n4\n")
    task = load_task("agentgym:sciworld", path=str(ids), env_url=fake.url)
    assert [e.meta["task_id"] for e in task.examples] == [0, 4]
    env = task.env(task.examples[1])
    env.reset()
    assert env.step("Action: hint")[1:] == (0.3, False)
    assert env.step("Action: fail")[1:] == (0.0, True)   # score -100 -> 0
    env.reset()
    assert env.step("Action: apple")[1:] == (1.0, True)
    env.close()
    task.close()   # sciworld frees its instances
    assert fake.count("/close") == 1 and fake.instances == {}


def test_alfworld_done_at_its_step_cap_is_not_success(servers):
    fake, = servers("alfworld", step_cap=2)
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    assert env.step("Action: look")[1:] == (0.0, False)
    assert env.step("Action: look")[1:] == (0.0, True)


def test_action_parsing():
    task = AgentGymTask("alfworld", env_url="http://127.0.0.1:1")
    assert task.parse_action("Thought: try\nAction: go to desk 1\nAction:\n look \n") == "look"
    assert task.parse_action("<think>Action: bad</think>\n\nAction: good") == "good"
    assert task.parse_action("<think>Action: unfinished") == ""
    assert task.parse_action("  open drawer 1 ") == "open drawer 1"   # no Action: -> the whole response
    assert len(task.parse_action("Action: " + "x" * 2000)) == 500
    assert len(AgentGymTask("alfworld", env_url="http://127.0.0.1:1", max_action_chars=20).parse_action("Action: " + "x" * 99)) == 20
    searchqa = AgentGymTask("searchqa", env_url="http://127.0.0.1:1", split="test")
    raw = "Thought: x\nAction: y <search>q</search>" + "z" * 600
    assert searchqa.parse_action(raw) == raw and searchqa.parse_action("<think>r</think>\n\n<answer>a</answer>") == "<answer>a</answer>"


def test_action_keys_are_the_parsed_actions():
    """Two responses that send the same command have the same key (the trainer's repeat check, SPEC §1),
    whatever their thoughts."""
    task = AgentGymTask("alfworld", env_url="http://127.0.0.1:1")
    env = task.env(task.examples[0])
    keys = {env.action_key(text) for text in ("Thought: a\nAction: look", "Thought: b\nAction: look",
                                               "<think>hm</think>\n\nThought: c\nAction: look ")}
    assert keys == {"look"} and env.action_key("Thought: a\nAction: apple") == "apple"


def test_step_before_reset():
    task = AgentGymTask("alfworld", env_url="http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="before reset"):
        task.env(task.examples[0]).step("Action: look")


def test_proxy_settings_are_ignored(servers, monkeypatch):
    fake, = servers("alfworld")
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")   # would fail if it were used
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    task = task_on([fake])
    env = task.env(task.examples[0])
    env.reset()
    assert env.step("Action: apple")[1:] == (1.0, True)


def test_default_ids_and_task_arguments():
    url = "http://127.0.0.1:1"
    train = load_task("agentgym:alfworld", env_url=url)
    test = load_task("agentgym:alfworld", split="test", env_url=url)
    assert [e.meta["task_id"] for e in train.examples] == list(range(2420))
    assert [e.meta["task_id"] for e in test.examples] == list(range(2420, 2620))
    assert len(load_task("agentgym:searchqa", env_url=url).examples) == 221328 - 51713
    assert [e.meta["task_id"] for e in load_task("agentgym:searchqa", split="test", env_url=url, n=3).examples] == [0, 1, 2]
    assert test.examples[0].id == "agentgym:alfworld:2420"
    with pytest.raises(ValueError, match="path="):
        load_task("agentgym:webshop", env_url=url)
    with pytest.raises(ValueError, match="path="):
        load_task("agentgym:sciworld", env_url=url)
    with pytest.raises(ValueError, match="env_url"):
        load_task("agentgym:alfworld")
    with pytest.raises(ValueError, match="not an http"):
        load_task("agentgym:alfworld", env_url="127.0.0.1:36001")
    with pytest.raises(ValueError, match="unknown AgentGym"):
        load_task("agentgym:babyai", env_url=url)
    with pytest.raises(ValueError, match="protocol"):
        load_task("agentgym:alfworld", env_url=url, protocol="v2")
    with pytest.raises(TypeError):
        load_task("agentgym:alfworld", env_url=url, digits=3)
    two = load_task("agentgym:alfworld", env_url=" http://127.0.0.1:36001/, http://127.0.0.1:36002 ")
    assert two.urls == ["http://127.0.0.1:36001", "http://127.0.0.1:36002"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:0", "http://h:abc", "http://h:-1",
                                 "http://a..b:1", "http://.a:1", "http://a b:1", "http://" + "a" * 64 + ":1",
                                 "http://[::1:36001", "http://[1.2.3]:1", "http://h\u00e9\u200b..x:1"])
def test_a_bad_env_url_is_one_line_naming_the_flag(url):
    with pytest.raises(ValueError) as e:
        load_task("agentgym:alfworld", env_url=f"http://127.0.0.1:36001,{url}")
    message = str(e.value)
    assert "--env_url" in message and "\n" not in message and repr(url) in message


@pytest.mark.parametrize("url", ["http://localhost:36001", "http://[::1]:36001", "https://env.example.org",
                                 "http://alfworld_1:36001", "http://127.0.0.1", "http://m\u00fcnchen.example:80/api"])
def test_good_env_urls_are_taken(url):
    assert load_task("agentgym:alfworld", env_url=url).urls == [url]


def test_a_bad_env_url_stops_icrl_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import icrl
    monkeypatch.setattr(icrl, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded"))
    with pytest.raises(SystemExit) as e:
        icrl.main(["--task", "agentgym:alfworld", "--env_url", "http://127.0.0.1:99999", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--env_url" in error and "99999" in error


def test_id_files(tmp_path):
    good = tmp_path / "ids.jsonl"
    good.write_text('{"id": 3}\n{"task_id": "7"}\n5\n"9"\n\nfixed_2\n')
    assert read_agentgym_ids(str(good)) == [3, 7, 5, 9, "fixed_2"]
    text = tmp_path / "ids.txt"
    text.write_text("12\n 13 \n")
    assert [e.meta["task_id"] for e in load_task("agentgym:webshop", path=str(text), env_url="http://127.0.0.1:1").examples] == [12, 13]


@pytest.mark.parametrize("content, where, what", [
    ('{"id": 1}\n{"name": 2}\n', ":2:", "'id' or 'task_id'"),
    ("1\n2\nabc def\n", ":3:", "not a task id"),
    ('{"id": 1\n', ":1:", "malformed JSON"),
    ("1\n\n2.5\n", ":3:", "not a task id"),
    ('{"id": -1}\n', ":1:", "negative"),
    ('{"id": true}\n', ":1:", "not a task id"),
    ('7\n{"id": null}\n', ":2:", "not a task id"),
    ("[1, 2]\n", ":1:", "not a task id"),
    ("[" * 100_000 + "]" * 100_000 + "\n", ":1:", "malformed JSON"),   # too deep for the parser
    ("9" * 5000 + "\n", ":1:", "malformed JSON"),                       # too long for int()
    (b"1\n\xff\n", ":2:", "not UTF-8"),
    ("\n\n", "", "empty"),
])
def test_bad_id_files_name_file_and_line(tmp_path, content, where, what):
    path = tmp_path / "ids.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        load_task("agentgym:alfworld", path=str(path), env_url="http://127.0.0.1:1")
    assert f"{path}{where}" in str(e.value) and what in str(e.value)


def test_missing_id_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ids.txt"):
        load_task("agentgym:webshop", path=str(tmp_path / "ids.txt"), env_url="http://127.0.0.1:1")


def test_a_held_out_evaluation_after_a_failed_one_tries_the_servers_again(servers, tmp_path, monkeypatch):
    """icrl.py's held-out evaluation whose server times out for good gives no figures; the task then starts over
    (Task.start_over), so the next evaluation, once the server answers, measures again and leaks no lease."""
    from transformers import AutoTokenizer
    from data import build_char_tokenizer
    from test_icrl import ScriptedActions, tiny_model
    build_char_tokenizer(str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    monkeypatch.setattr(icrl, "generate", ScriptedActions(tokenizer, [["Action: apple"]] * 20))
    args = icrl.parse_args(["--batch_prompts", "1", "--max_turns", "2"])
    fake, = servers("alfworld")
    task = task_on([fake], timeout=0.3)
    model, examples = tiny_model(len(tokenizer)), task.examples[:2]
    fake.always["/reset"] = ("sleep", 1.0)
    assert icrl.critique_free_accuracy(model, tokenizer, task, examples, args, icrl.Dist(), 1) == (None, None)
    del fake.always["/reset"]
    greedy, sampled = icrl.critique_free_accuracy(model, tokenizer, task, examples, args, icrl.Dist(), 1)
    assert greedy is not None and sampled is not None and task.pool.live() == [0]


def test_starting_over_keeps_the_healthy_servers_instances(servers):
    """start_over forgets the failed server's instances only: alfworld and webshop never free one, so a healthy
    server's are reused rather than created again at every failed evaluation."""
    a, b = servers("alfworld", 2)
    task = task_on([a, b], timeout=0.3)
    envs = [task.env(example) for example in task.examples[:2]]   # one episode on each server
    icrl.call_envs(envs, "reset", [()] * 2)
    created = a.count("/create"), b.count("/create")
    b.always["/step"] = ("sleep", 1.0)
    with pytest.raises(RuntimeError, match="no reply within 0.3 s"):
        icrl.call_envs(envs, "step", [("Action: look",)] * 2)
    del b.always["/step"]
    task.start_over()
    icrl.call_envs([task.env(example) for example in task.examples[:2]], "reset", [()] * 2)
    assert a.count("/create") == created[0] and b.count("/create") > created[1]
