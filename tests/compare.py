"""ICRL against GRPO and every ablation, over seeds, as a table and curves (`make compare`, issue #12).

    .venv/bin/python tests/compare.py                       # make compare: 3 seeds, every variant, every task
    .venv/bin/python tests/compare.py --seeds 0 --variants icrl grpo --tasks arithmetic
    .venv/bin/python tests/compare.py --summary_only        # the table and curves from the runs on disk

For each task and seed: one warm start (`icrl.py --steps 0`: the supervised warm start of the tiny
default model, written to DIR/warm_start), then from those same weights every variant for the same
number of RL steps (the task's own, `data.Task.rl_steps`, unless --steps; `--model DIR/warm_start
--warm_start_steps 0 --micro_batch 64`), each as
`torchrun --standalone --nproc_per_node NPROC icrl.py ...` with OMP_NUM_THREADS=1; then `eval.py` on
the warm start and on every final checkpoint, all with the same held-out set and seeds (eval.py's
`--task_seed 0 --seed 0`, its default 200 examples x 4 chains, K = 2, the failure gate).

    OUT/<task>/warm_start/seed<k>           the warm start (warm_start/, train.log, eval/summary.json)
    OUT/<task>/<variant>/seed<k>            a variant (final/, metrics.jsonl, train.log, eval/summary.json)
    OUT/summary.md, OUT/summary.json        the table (also printed); OUT/<task>.png the curves

A run is complete when its folder has final/ and its metrics.jsonl has the last step; complete runs are
skipped, so an interrupted comparison continues where it stopped. An incomplete run resumes from its
latest step checkpoint when it has one (`--resume`, only with --save_every in --icrl_args), otherwise
its folder is removed and the run redone. A complete run whose compare_run.json records other icrl.py
flags, another process count, other code (code_version) or another warm start (the one it began from, by
its start time) is redone; an evaluation is redone when its flags or code changed, or its record does not
name it. The paths inside OUT are no setting: a renamed OUT, or another spelling of it, is the same
comparison; a relative OUT is relative to the folder compare.py is started in, for icrl.py and eval.py too.
A run made by hand (no record) is trusted, also once compare.py has evaluated it. Wall time is measured
here, per run, and kept in the run's compare_run.json. The summary covers every complete run under OUT
(with the task's RL steps), not only the seeds and variants of this invocation, so SEEDS=3 after a 3-seed
comparison gives a 4-seed table; it leaves out, each with a line saying why, a run that is incomplete (or
has other RL steps) or that this invocation did not bring up to date: made by other code, begun from an
earlier warm start of its seed, evaluated by other code or with other eval.py flags than its warm start, or
of a seed whose warm start was trained or evaluated otherwise (icrl.py flags, process count, eval.py flags)
than the table's (the one most seeds share; a tie: this invocation's). A figure over fewer seeds than its row's names them. A table with no run left
does not replace one on disk.
"""
import argparse
import ast
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import task_class  # noqa: E402  (pure Python: no torch in this process)

# variant name -> icrl.py flags (SPEC §2: the baseline and the ablations)
VARIANTS = {
    "icrl": [],
    "grpo": ["--algo", "grpo"],
    "calib_none": ["--calib", "none"],
    "adv_pooled": ["--adv", "pooled"],
    "no_critic_train": ["--no_critic_train"],
    "gate_always": ["--critic_gate", "always"],
}
# the embedded default (boxes) and arithmetic get every variant; guess gets ICRL against GRPO
TASKS = {"arithmetic": list(VARIANTS), "guess": ["icrl", "grpo"], "boxes": list(VARIANTS)}
BASELINE = "grpo"
WARM = "warm_start"
# flags compare.py sets itself; --icrl_args may not carry them, nor an abbreviation of one (flags_meant)
MANAGED = ("--steps", "--out", "--seed", "--task", "--model", "--resume", "--algo", "--calib", "--adv",
           "--no_critic_train", "--critic_gate")
# eval.py flags compare.py sets itself (which checkpoint, task, seeds and folder); --eval_args may not carry them
EVAL_MANAGED = ("--model", "--task", "--task_seed", "--seed", "--out")
# icrl.py flags that mean the same in eval.py: passed on to every evaluation (before --eval_args), so a
# comparison shrunk or changed through --icrl_args is evaluated on the same task and limits
SHARED_VALUE = ("--task_knob", "--env_url", "--eval_file", "--dtype", "--max_new_tokens", "--critic_max_new_tokens",
                "--temperature", "--top_p", "--max_turns", "--max_context", "--obs_chars", "--rounds")
SHARED_SWITCH = ("--enable_thinking",)
START_RE = re.compile(r"when RL begins \(step 0[^)]*\): pass@1 ([0-9.]+)")


# ==================================================================================================
# Running
# ==================================================================================================

def run_command(cmd, log_path, env):
    """Run `cmd` with stdout and stderr appended to log_path; returns the exit status. It runs in this
    process's folder, so that a relative OUT names the same folder here and for icrl.py and eval.py (both
    are given by absolute path). Tests replace this function to record the calls."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def torchrun(nproc):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    return launcher + ["--standalone", "--nproc_per_node", str(nproc), os.path.join(ROOT, "icrl.py")]


def flags_meant(word, names):
    """Those of names that `word` (`--flag` or `--flag=value`) may stand for: icrl.py's parser takes an exact
    name, else any unambiguous prefix of one (--alg is --algo)."""
    name = word.split("=")[0]
    if not name.startswith("--") or len(name) < 3:  # a value, or `--`
        return []
    return [name] if name in names else [n for n in names if n.startswith(name)]


def shared_eval_flags(icrl_flags):
    """The SHARED_VALUE / SHARED_SWITCH flags among icrl_flags, in order (`--flag value` or `--flag=value`),
    each by its full name: an abbreviation icrl.py reads may be ambiguous to eval.py (--critic_m)."""
    out, i = [], 0
    while i < len(icrl_flags):
        meant = flags_meant(icrl_flags[i], SHARED_VALUE + SHARED_SWITCH)
        if len(meant) == 1 and meant[0] in SHARED_VALUE:
            _, eq, value = icrl_flags[i].partition("=")
            out += [f"{meant[0]}={value}"] if eq else [meant[0]] + icrl_flags[i + 1:i + 2]
            i += 1 if eq else 2
            continue
        if len(meant) == 1:
            out.append(meant[0])
        i += 1
    return out


def without_values(flags, names):
    """flags less each of names and the value after it (`--name value`, as compare.py writes them)."""
    if not isinstance(flags, list):  # a hand-edited record
        return flags
    return [flag for i, flag in enumerate(flags) if flag not in names and not (i and flags[i - 1] in names)]


# flags whose values are paths inside OUT, fixed by the run's folder: another spelling of OUT (./X, an absolute
# path, a renamed folder) is the same comparison
PATH_FLAGS = ("--out", "--model")


def same_setting(record, setting, missing_ok=False):
    """Whether record holds setting, the PATH_FLAGS' values aside. A key the record lacks is None (a record
    from before compare.py recorded warm starts: is_stale reads it so too), or the same when missing_ok."""
    for key, value in setting.items():
        old = record.get(key, value if missing_ok else None)
        if key == "flags":
            old, value = without_values(old, PATH_FLAGS), without_values(value, PATH_FLAGS)
        if old != value:
            return False
    return True


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_metrics(run):
    """metrics.jsonl's rows (a torn last line, from a kill mid-write, is dropped)."""
    rows = []
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return rows


def last_step(run):
    rows = read_metrics(run)
    return rows[-1]["step"] if rows else 0


@functools.cache
def code_version():
    """A hash of the code that trains and evaluates: a complete run made by other code is redone, as one made
    with other flags is (a changed default changes no flag)."""
    digest = hashlib.sha256()
    for name in ("icrl.py", "model.py", "data.py", "eval.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def incomplete(run, steps):
    """Why run is not a complete run of `steps` RL steps, or None. final/ is written last and renamed into
    place whole; metrics.jsonl must reach the last step (a warm-start run has --steps 0 and no metrics
    lines, but needs its warm_start/)."""
    if not os.path.isdir(os.path.join(run, "final")):
        return "no final/ (unfinished, or failed: see its train.log)"
    if steps == 0:
        return None if os.path.isdir(os.path.join(run, WARM)) else f"no {WARM}/"
    done = last_step(run)
    return None if done == steps else f"has {done} of the {steps} RL steps (--steps)"


def is_complete(run, steps):
    return incomplete(run, steps) is None


def eval_complete(run):
    return os.path.isfile(os.path.join(run, "eval", "summary.json"))


def resumable_checkpoint(run, steps):
    """The latest step_N checkpoint of an incomplete run (0 < N < steps), or None."""
    try:
        with open(os.path.join(run, "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    match = re.fullmatch(r"step_(\d+)", name)
    if not match or not 0 < int(match.group(1)) < steps:
        return None
    if not os.path.isfile(os.path.join(run, name, "trainer_state.json")):
        return None
    return os.path.join(run, name)


class Runner:
    def __init__(self, args):
        self.args = args
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        self.failed = []
        self.ran = []

    def train(self, run, flags, steps, force=False, warm_start=None):
        """One icrl.py run into `run`. Skipped when complete and run with the same flags, process count, code
        and warm start (`warm_start`: the "started" of the warm start's record; None for a warm start); redone
        when `force` (its warm start was just redone). Returns "skipped", "ran", or None on failure."""
        cmd = torchrun(self.args.nproc) + flags
        setting = {"flags": flags, "nproc": self.args.nproc, "code": code_version(), "warm_start": warm_start}
        record_path = os.path.join(run, "compare_run.json")
        record = read_json(record_path, {})
        if is_complete(run, steps) and not force:
            # No record, or the one Runner.evaluate began for it: made by hand, trusted. A record without the
            # setting (its evaluation's alone, from a compare.py that did not record training runs yet) cannot
            # vouch for the code that trained it.
            if not record or record.get("by_hand") or same_setting(record, setting):
                print(f"  {run}: complete, skipped")
                return "skipped"
            print(f"  {run}: complete, but made by other code, flags, process count or warm start (code "
                  f"{record.get('code')}, {record.get('nproc')} x {shlex.join(record.get('flags', []))}): removed "
                  f"and redone")
            shutil.rmtree(run)
        checkpoint = None if force or not steps else resumable_checkpoint(run, steps)
        if checkpoint and not same_setting(record, setting, missing_ok=True):
            checkpoint = None
        if checkpoint:
            cmd = cmd + ["--resume", run]
            print(f"  {run}: incomplete, resuming from {checkpoint}")
        elif os.path.exists(run):
            print(f"  {run}: " + ("its warm start was redone" if force else "incomplete") + ": removed and redone")
            shutil.rmtree(run)
        if not checkpoint:  # the folder already holds this run's train.log: icrl.py refuses a non-empty --out
            cmd = cmd + ["--overwrite"]
        os.makedirs(run, exist_ok=True)
        attempts = record.get("attempts", []) if checkpoint else []
        # a new start time identifies a new run: the runs begun from a warm start record it (is_stale)
        started = record.get("started") if checkpoint else time.time()
        print(f"  {run}: {shlex.join(cmd)}", flush=True)
        t, rc = time.perf_counter(), None
        try:
            rc = self._run(cmd, os.path.join(run, "train.log"))
        finally:
            attempts.append(round(time.perf_counter() - t, 3))
            write_json(record_path, dict(setting, started=started, cmd=cmd, resumed=bool(checkpoint),
                                         attempts=attempts, wall_s=sum(attempts), returncode=rc,
                                         complete=rc == 0 and is_complete(run, steps)))
        if rc != 0 or not is_complete(run, steps):
            self.fail(f"{run}: icrl.py exited with {rc}" + ("" if rc else " but the run is not complete")
                      + f" (log: {os.path.join(run, 'train.log')})")
            return None
        print(f"  {run}: done in {attempts[-1]:.0f}s", flush=True)
        return "ran"

    def evaluate(self, run, checkpoint, task):
        """eval.py on run/checkpoint into run/eval; skipped when its summary.json exists from the same flags."""
        flags = ["--model", os.path.join(run, checkpoint), "--task", task, "--task_seed", "0", "--seed", "0"] + \
            shared_eval_flags(self.args.icrl_flags) + self.args.eval_flags + ["--out", os.path.join(run, "eval")]
        record_path = os.path.join(run, "compare_run.json")
        done = read_json(record_path, {})
        # No record: made and evaluated by hand, trusted. Otherwise the record must name this evaluation; one it
        # lacks (compare.py cut off as eval.py ended, or an evaluation by hand) is redone: is_stale leaves it out.
        if eval_complete(run) and (not done or shared_eval_part(done.get("eval_flags")) == shared_eval_part(flags)
                                   and done.get("eval_code") == code_version()):
            return True
        cmd = [sys.executable, os.path.join(ROOT, "eval.py")] + flags
        # an evaluation that fails must not leave the previous one's summary.json to be read as this one's
        shutil.rmtree(os.path.join(run, "eval"), ignore_errors=True)
        print(f"  {run}: {shlex.join(cmd)}", flush=True)
        t = time.perf_counter()
        rc = self._run(cmd, os.path.join(run, "eval.log"))
        record = read_json(record_path, {})
        if not record:  # a run made by hand: still trusted once its evaluation is recorded (train, is_stale)
            record["by_hand"] = True
        record.update(eval_flags=flags, eval_code=code_version(), eval_wall_s=round(time.perf_counter() - t, 3))
        write_json(record_path, record)
        if rc != 0 or not eval_complete(run):
            self.fail(f"{run}: eval.py exited with {rc} (log: {os.path.join(run, 'eval.log')})")
            return False
        return True

    def _run(self, cmd, log):
        self.ran.append(cmd)
        return run_command(cmd, log, self.env)

    def fail(self, message):
        print(f"  FAILED {message}", flush=True)
        self.failed.append(message)


def run_comparison(args):
    runner = Runner(args)
    for task in args.tasks:
        variants = [v for v in TASKS[task] if not args.variants or v in args.variants]
        if not variants:
            print(f"{task}: none of {args.variants} is compared on {task} ({', '.join(TASKS[task])}); skipped")
            continue
        steps = task_steps(task, args.steps)
        for seed in args.seeds:
            print(f"{task}, seed {seed}:", flush=True)
            common = ["--task", task, "--seed", str(seed)] + args.icrl_flags
            warm = os.path.join(args.out, task, WARM, f"seed{seed}")
            status = runner.train(warm, common + ["--steps", "0", "--out", warm], steps=0)
            if status is None:
                continue  # no starting point: this seed's variants cannot run
            runner.evaluate(warm, WARM, task)
            started = read_json(os.path.join(warm, "compare_run.json"), {}).get("started")
            for variant in variants:
                run = os.path.join(args.out, task, variant, f"seed{seed}")
                # micro-batches as make train's (a --model folder defaults to 2, for real models); --icrl_args
                # may override them
                flags = ["--micro_batch", "64"] + common + ["--model", os.path.join(warm, WARM),
                                                            "--warm_start_steps", "0", "--steps", str(steps),
                                                            "--out", run] + VARIANTS[variant]
                # a warm start (re)made now makes every earlier run of this seed stale
                if runner.train(run, flags, steps, force=status == "ran", warm_start=started):
                    runner.evaluate(run, "final", task)
    return runner


# ==================================================================================================
# Summary
# ==================================================================================================

def mean_std(values):
    """Mean and sample standard deviation (n - 1) of the values that are not None; std is None for
    fewer than two values, mean None for none."""
    xs = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


def start_eval_acc(run):
    """The held-out pass@1 icrl.py printed when RL began (step 0), from the run's train.log."""
    try:
        with open(os.path.join(run, "train.log"), errors="replace") as f:
            found = START_RE.findall(f.read())
    except OSError:
        return None
    return float(found[-1]) if found else None


def seed_folders(folder):
    """{seed: path} of the seed<k> folders under folder."""
    out = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            match = re.fullmatch(r"seed(\d+)", name)
            if match:
                out[int(match.group(1))] = os.path.join(folder, name)
    return dict(sorted(out.items()))


def run_figures(run):
    """One complete run's figures: eval.py's summary (null where absent), the training log's held-out
    pass@1 at the start and end, the curve and the wall time."""
    ev = read_json(os.path.join(run, "eval", "summary.json"), {})
    rows = read_metrics(run)
    curve = [(r["step"], r["eval_acc"]) for r in rows if r.get("eval_acc") is not None]
    start = start_eval_acc(run)
    if start is not None:
        curve = [(0, start)] + curve
    record = read_json(os.path.join(run, "compare_run.json"), {})
    settings = {k: ev.get(k) for k in eval_setting_names()}
    return {"eval": settings, "pass1": ev.get("pass@1"), "critique_value": ev.get("critique_value"),
            "acc_round_2": ev.get("acc_round_2"), "eval_acc_start": start,
            "eval_acc_end": rows[-1].get("eval_acc") if rows else None, "curve": curve,
            "wall_s": record.get("wall_s"), "eval_wall_s": record.get("eval_wall_s")}


@functools.cache
def eval_setting_names():
    """The settings eval.py writes into summary.json (its SETTINGS, read from its source: importing eval.py
    would import torch) less the model's path, with the number of examples and the critic: the same for every
    checkpoint of a task's table."""
    with open(os.path.join(ROOT, "eval.py")) as f:
        tree = ast.parse(f.read())
    names = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "SETTINGS" for t in node.targets))
    return ("examples",) + tuple(n for n in names if n != "model") + ("critic_model",)


def shared_eval_part(flags):
    """eval.py flags as Runner.evaluate builds them, less their first and last pair (--model and --out): the
    same for every checkpoint evaluated with the same settings."""
    return (flags or [])[2:-2]


def is_stale(run, warm_record=None):
    """Why a complete run does not belong in the table now, or None: made by other code, begun from another
    warm start than its seed's (warm_record: that warm start's compare_run.json; None for a warm start), or
    evaluated by other code or with other eval.py flags than that warm start. The icrl.py flags need no
    check: other flags make another warm start. A run with no record, or only its evaluation's "by_hand" one
    (made by hand), is trusted, as by Runner.train; its evaluation too when there is no record."""
    record = read_json(os.path.join(run, "compare_run.json"), {})
    if not record:
        return None
    if not record.get("by_hand"):
        if record.get("code") != code_version():
            return f"trained by other code (code_version {record.get('code')}, now {code_version()})"
        if warm_record is not None and record.get("warm_start") != warm_record.get("started"):
            return "trained from an earlier warm start of its seed"
    if eval_complete(run):
        if "eval_code" not in record:
            return "its evaluation is not in its record (cut off, or made by hand): the next comparison redoes it"
        if record["eval_code"] != code_version():
            return f"evaluated by other code (code_version {record['eval_code']}, now {code_version()})"
        if warm_record and "eval_flags" in warm_record and \
                shared_eval_part(record.get("eval_flags")) != shared_eval_part(warm_record["eval_flags"]):
            return "evaluated with other eval.py flags than its warm start"
    return None


def seed_setting(warm_record):
    """What every seed of a task's table must share, from its warm start's record (its variants follow their
    warm start: is_stale): the icrl.py flags less --seed and the paths, the process count, and the eval.py
    flags less the paths. None for a warm start made by hand."""
    if "flags" not in warm_record:
        return None
    return {"icrl.py flags": without_values(warm_record["flags"], PATH_FLAGS + ("--seed",)),
            "nproc": warm_record.get("nproc"), "eval.py flags": shared_eval_part(warm_record.get("eval_flags"))}


def other_settings(warm_records, invoked=()):
    """{seed: why} for the seeds (by their warm starts' records) trained or evaluated otherwise than the table's:
    the setting most seeds share, among those evaluated whole (eval_flags recorded); a tie goes to the setting of
    this invocation's seeds (`invoked`), then to the one whose warm start was made last. So a seed added later
    with other ICRL_ARGS, EVAL_ARGS or NPROC, or one left behind by a rerun of the others, is no seed of this
    table."""
    settings = {seed: seed_setting(r) for seed, r in sorted(warm_records.items()) if seed_setting(r) is not None}
    if not settings:
        return {}
    key = lambda setting: json.dumps(setting, sort_keys=True)
    share = {k: [seed for seed in settings if key(settings[seed]) == k] for k in map(key, settings.values())}
    whole = [k for k in share if any("eval_flags" in warm_records[seed] for seed in share[k])] or list(share)
    newest = lambda k: max(float(warm_records[seed].get("started") or 0) for seed in share[k])
    first = share[max(whole, key=lambda k: (len(share[k]), any(seed in invoked for seed in share[k]), newest(k)))][0]

    def show(value):
        return " ".join(map(str, value)) if isinstance(value, list) else value
    why = {}
    for seed, setting in settings.items():
        differs = [f"{key} {show(value)} where seed {first}'s has {show(settings[first][key])}"
                   for key, value in setting.items() if value != settings[first][key]]
        if differs:
            why[seed] = f"trained or evaluated otherwise than seed {first}, of the table's setting: " + "; ".join(differs)
    return why


def included(run, steps, warm_record=None, why_not=None):
    """Whether a run counts in the table: complete (see incomplete), not stale (is_stale), and of the table's
    setting (why_not: other_settings' line for its seed); one left out is named, with why, on stdout."""
    why = incomplete(run, steps) or is_stale(run, warm_record) or why_not
    if why:
        print(f"left out of the table: {run}: {why}")
    return not why


def task_steps(task, steps=None):
    """RL steps of every run of `task`: `steps` when given (--steps), else the task's own."""
    return steps or task_class(task).rl_steps


def summarize(out, steps=None, invoked=()):
    """Every complete, current run under out (tasks and variants known to this script), as summary.json's
    dict; a run counts when it has its task's RL steps (task_steps) and is not stale (is_stale)."""
    summary = {"tasks": {}}
    for task, task_variants in TASKS.items():
        task_rl_steps = task_steps(task, steps)
        warm_folder = os.path.join(out, task, WARM)
        warm_runs = seed_folders(warm_folder)
        warm_record = lambda seed: read_json(os.path.join(warm_folder, f"seed{seed}", "compare_run.json"), {})
        current = {seed: warm_record(seed) for seed, run in warm_runs.items() if not incomplete(run, 0) and not is_stale(run)}
        other = other_settings(current, invoked)
        warm = {seed: run_figures(run) for seed, run in warm_runs.items() if included(run, 0, why_not=other.get(seed))}
        variants = {}
        for variant in task_variants:
            runs = {seed: run_figures(run) for seed, run in seed_folders(os.path.join(out, task, variant)).items()
                    if included(run, task_rl_steps, warm_record(seed), other.get(seed))}
            if runs:
                variants[variant] = runs
        if not variants and not warm:
            continue
        base = variants.get(BASELINE, {})
        table = {}
        if warm:
            table[WARM] = {"seeds": list(warm), "pass1_end": mean_std(f["pass1"] for f in warm.values()),
                           "critique_value": mean_std(f["critique_value"] for f in warm.values()),
                           "acc_round_2": mean_std(f["acc_round_2"] for f in warm.values()),
                           "eval_acc_end": mean_std(f["eval_acc_start"] for f in warm.values()),
                           "wall_s": mean_std(f["wall_s"] for f in warm.values()), "per_seed": warm}
        for variant, runs in variants.items():
            per_seed = {}
            for seed, f in runs.items():
                start = warm.get(seed, {}).get("pass1")
                f = dict(f, pass1_start=start,
                         gain=None if start is None or f["pass1"] is None else f["pass1"] - start)
                b = base.get(seed, {}).get("pass1")
                f["diff_grpo"] = None if variant == BASELINE or b is None or f["pass1"] is None else f["pass1"] - b
                per_seed[seed] = f
            table[variant] = {"seeds": list(per_seed)}
            for key in ("pass1_start", "pass1_end", "gain", "diff_grpo", "critique_value", "acc_round_2",
                        "eval_acc_start", "eval_acc_end", "wall_s", "eval_wall_s"):
                source = "pass1" if key == "pass1_end" else key
                table[variant][key] = mean_std(f[source] for f in per_seed.values())
            table[variant]["per_seed"] = per_seed
        summary["tasks"][task] = {"steps": task_rl_steps, "rows": table,
                                  "curves": {v: curve_stats(r) for v, r in variants.items()},
                                  "total_wall_s": total_wall(table)}
    return summary


def curve_stats(runs):
    """Mean and sample std over seeds of eval_acc at each logged step."""
    by_step = {}
    for f in runs.values():
        for step, acc in f["curve"]:
            by_step.setdefault(step, []).append(acc)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return {"steps": steps, "mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
            "n": [s["n"] for s in stats]}


def total_wall(table):
    return sum((f.get("wall_s") or 0) + (f.get("eval_wall_s") or 0)
               for row in table.values() for f in row["per_seed"].values())


def fmt(stat, scale=100.0, signed=False, digits=1):
    if stat["mean"] is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{scale * stat['mean']:{sign}.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat["std"] is not None else "")


def fmt_seconds(stat):
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.0f} s" + (f" ± {stat['std']:.0f}" if stat["std"] is not None else "")


def covered(row, source):
    """' (seeds a,b)' where fewer than the row's seeds have per-seed figure `source` (a failed evaluation, a
    null figure; for the Δ to GRPO, no GRPO run of that seed), else ''."""
    have = [str(seed) for seed, f in row["per_seed"].items() if f.get(source) is not None]
    return f" (seeds {','.join(have)})" if 0 < len(have) < len(row["seeds"]) else ""


def markdown(summary):
    lines = []
    for task, t in summary["tasks"].items():
        lines += [f"### {task} ({t['steps']} RL steps)", "",
                  "| variant | seeds | pass@1 when RL began (%) | pass@1 at the end (%) | gain (points) | "
                  "Δ to GRPO at the end (points) | critique_value (points) | acc_round_2 (%) | "
                  "training-log eval_acc at the end (%) | wall time per run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in t["rows"].items():
            seeds = ",".join(str(s) for s in row["seeds"])

            def cell(key, source=None, show=fmt, **kwargs):  # source: the per-seed figure the statistic is of
                return show(row[key], **kwargs) + covered(row, source or key)
            if name == WARM:
                lines.append(f"| warm start (RL's starting point) | {seeds} | | {cell('pass1_end', 'pass1')} | | | "
                             f"{cell('critique_value', signed=True)} | {cell('acc_round_2')} | "
                             f"{cell('eval_acc_end', 'eval_acc_start')} | {cell('wall_s', show=fmt_seconds)} |")
                continue
            diff = "(baseline)" if name == BASELINE else cell("diff_grpo", signed=True)
            lines.append(f"| {name} | {seeds} | {cell('pass1_start')} | {cell('pass1_end', 'pass1')} | "
                         f"{cell('gain', signed=True)} | {diff} | {cell('critique_value', signed=True)} | "
                         f"{cell('acc_round_2')} | {cell('eval_acc_end')} | {cell('wall_s', show=fmt_seconds)} |")
        lines += ["", f"Runs and evaluations of this table took {t['total_wall_s'] / 60:.1f} min of wall time in all.", ""]
    lines += ["Mean ± sample standard deviation over seeds (none shown for one seed); a figure followed by "
              "(seeds …) covers only those of its row's seeds (a failed evaluation, a null figure; for the Δ, no "
              "GRPO run of that seed). pass@1, critique_value and "
              f"acc_round_2 are eval.py's on the same held-out set for every checkpoint ({eval_settings(summary)}); "
              "'when RL began' is the seed's warm start. Δ to GRPO: per seed, the "
              "variant's final pass@1 minus GRPO's on the same seed (the same warm start), then mean ± std of "
              "those differences. The training-log eval_acc is icrl.py's own held-out pass@1 at the last step "
              "(its held-out set is drawn with the run's seed). Wall time: the icrl.py run, measured by compare.py."]
    return "\n".join(lines) + "\n"


def eval_settings(summary):
    """eval.py's settings, as each summary.json recorded them (eval_setting_names): meant to be the same for
    every checkpoint; a WARNING names each that is not, with its values."""
    parts = []
    for name, t in summary["tasks"].items():  # each task has its own held-out set: compared within a task
        seen = []
        for row in t["rows"].values():
            for f in row["per_seed"].values():
                e = f.get("eval") or {}
                if e.get("n") is not None and e not in seen:
                    seen.append(e)
        if not seen:
            continue
        e = seen[0]
        text = (f"{e.get('examples')} problems × {e['n']} chains, K = {e.get('rounds')}, gate {e.get('critic_gate')}, "
                f"task seed {e.get('task_seed')}, sampling seed {e.get('seed')}")
        if len(seen) > 1:
            differs = []
            for key in e:
                values = list(dict.fromkeys(json.dumps(other.get(key)) for other in seen))
                differs += [f"{key} {' / '.join(values)}"] if len(values) > 1 else []
            text = "WARNING, not the same for every checkpoint: " + "; ".join(differs)
        parts.append(text if len(summary["tasks"]) == 1 else f"{name}: {text}")
    return "; ".join(parts) or "no evaluation yet"


def plot_curves(task, curves, steps, path):
    """Held-out pass@1 (eval_acc) against RL step, mean over seeds, ±1 std shaded. The plotting package
    is a test/report requirement only (requirements-test.txt), imported here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (requirements-test.txt): no {path}")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, c in curves.items():
        if not c["steps"]:
            continue
        mean = [100 * m for m in c["mean"]]
        line, = ax.plot(c["steps"], mean, marker="o", ms=3, label=f"{variant} (n={max(c['n'])})")
        lo = [m - 100 * (s or 0) for m, s in zip(mean, c["std"])]
        hi = [m + 100 * (s or 0) for m, s in zip(mean, c["std"])]
        ax.fill_between(c["steps"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out critique-free pass@1 (%)")
    ax.set_title(f"{task}: mean over seeds, ±1 std shaded ({steps} RL steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def has_table(out):
    """Whether OUT's summary.json or summary.md holds a table (of at least one task)."""
    old = read_json(os.path.join(out, "summary.json"), {})
    try:
        with open(os.path.join(out, "summary.md")) as f:
            text = f.read()
    except OSError:
        text = ""
    return isinstance(old, dict) and bool(old.get("tasks")) or "### " in text


def write_summary(out, steps=None, plot=True, invoked=()):
    """summary.json, summary.md and the curves of OUT; None, writing nothing, where no run counts but OUT holds
    a table already (say, of runs made by other code): an empty table does not replace it."""
    summary = summarize(out, steps, invoked)
    if not summary["tasks"] and has_table(out):
        print(f"no complete, current run under {out} (see the lines above): its summary.md and summary.json, "
              "of earlier runs, are left as they are")
        return None
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), summary)
    text = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    pngs = []
    if plot:
        for task, t in summary["tasks"].items():
            if t["curves"] and plot_curves(task, t["curves"], t["steps"], os.path.join(out, f"{task}.png")):
                pngs.append(f"{task}.png")
    return summary, text, pngs


# ==================================================================================================
# Command line
# ==================================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (make compare SEEDS=)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="only these variants (make compare VARIANTS=); default: every variant of each task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="make compare TASK=")
    p.add_argument("--steps", type=int, default=None, help="RL steps of every variant of every task (default: "
                   "each task's own, as make train uses: 60; boxes 150)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun --nproc_per_node (make compare NPROC=)")
    p.add_argument("--out", default="runs/compare", help="the compare folder")
    p.add_argument("--icrl_args", default="", help="extra icrl.py flags for every run, warm start included, "
                   "one shell-quoted string (e.g. to shrink the runs in a test)")
    p.add_argument("--eval_args", default="", help="extra eval.py flags, one shell-quoted string")
    p.add_argument("--summary_only", action="store_true", help="run nothing: the table and curves of the "
                   "complete runs under --out")
    p.add_argument("--no_plot", action="store_true", help="no PNG")
    args = p.parse_args(argv)
    args.icrl_flags, args.eval_flags = shlex.split(args.icrl_args), shlex.split(args.eval_args)
    for option, flags, names in (("--icrl_args", args.icrl_flags, MANAGED), ("--eval_args", args.eval_flags, EVAL_MANAGED)):
        managed = [f"{f} ({', '.join(flags_meant(f, names))})" for f in flags if flags_meant(f, names)]
        if managed:
            p.error(f"{option} may not set {', '.join(managed)}: compare.py sets it (use --steps, --seeds, --tasks, "
                    "--variants, --out)")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    t = time.perf_counter()
    runner = None
    if not args.summary_only:
        runner = run_comparison(args)
        print(f"comparison: {(time.perf_counter() - t) / 60:.1f} min in this invocation "
              f"({len(runner.ran)} command(s) run)")
    written = write_summary(args.out, args.steps, plot=not args.no_plot, invoked=() if args.summary_only else args.seeds)
    if written:
        _, text, pngs = written
        print()
        print(text)
        print(f"wrote {os.path.join(args.out, 'summary.md')}, summary.json" + "".join(f", {png}" for png in pngs))
    if runner and runner.failed:
        print(f"{len(runner.failed)} failure(s):\n  " + "\n  ".join(runner.failed))
        return 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
