"""icrl.py's run folder and command line (issue 13): a resume continues the run it names, in its own
folder, with its own settings; a fresh run never replaces a run without --overwrite; every mistake in a
flag, a data file or a checkpoint is one line naming it, before the model loads; prompts longer than the
model's context are dropped before training; checkpoints carry their stop ids for `transformers`; a kill
at any point of a save leaves a loadable `latest`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import icrl
from test_icrl import ROOT, TINY_RUN, tiny_model

# The cheapest end-to-end run: no warm start, one query of G = 2, one held-out example sampled once.
FAST = TINY_RUN + ["--warm_start_steps", "0", "--batch_prompts", "1", "--max_new_tokens", "4",
                   "--critic_max_new_tokens", "4", "--eval_examples", "1", "--eval_samples", "1"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-step run saved at every step: step_1, step_2 (final), latest, metrics.jsonl."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    old_umask = os.umask(0o022)
    try:
        icrl.main(FAST + ["--steps", "2", "--save_every", "1", "--out", out])
    finally:
        os.umask(old_umask)
    return out


def copy_run(base, dest):
    shutil.copytree(base, dest, symlinks=True)
    return str(dest)


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Loading model weights (or building the tiny model) or starting the warm start fails the test."""
    class Stub:
        def __init__(self, *args, **kwargs):
            raise ModelLoaded("the model was built before the command line was checked")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ModelLoaded("the model weights were loaded before the command line was checked")

    monkeypatch.setattr(icrl, "Qwen3", Stub)
    monkeypatch.setattr(icrl, "warm_start", Stub.from_pretrained)


def usage_error(capsys, argv):
    """Run icrl.main(argv); it must stop with exit status 2 and one line on stderr; returns that line."""
    capsys.readouterr()  # what came before (a fixture's progress bars) is not the run's
    with pytest.raises(SystemExit) as e:
        icrl.main(argv)
    assert e.value.code == 2, e.value.code
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# ==================================================================================================
# 1. The run folder never loses work
# ==================================================================================================

def test_resume_of_a_checkpoint_continues_its_own_run_folder(base_run, tmp_path, monkeypatch):
    """`--resume RUN/final` with no --out and no other flag: the run continues in RUN (not in the default
    runs/icrl), with RUN's saved settings (G = 2, one query per step ...), its metrics appended."""
    run = copy_run(base_run, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    icrl.main(["--resume", os.path.join(run, "final"), "--steps", "3", "--eval_every", "0"])
    assert not os.path.exists(tmp_path / "runs")
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    assert open(os.path.join(run, "latest")).read().strip() == "step_3"
    assert os.path.realpath(os.path.join(run, "final")) == os.path.realpath(os.path.join(run, "step_3"))
    saved = icrl.read_trainer_state(os.path.join(run, "final"))
    assert saved["step"] == 3
    assert (saved["args"]["group_size"], saved["args"]["batch_prompts"], saved["args"]["warm_start_steps"]) == (2, 1, 0)
    assert os.path.realpath(saved["args"]["out"]) == os.path.realpath(run)


def test_resuming_an_earlier_checkpoint_rewrites_the_damaged_one_latest_names(base_run, tmp_path):
    """`latest` names step_2, which is gone: the error says to resume from another checkpoint; doing so from
    step_1 trains step 2 again and must write step_2 anew, not take the missing folder for a saved one."""
    run = copy_run(base_run, tmp_path / "a")
    shutil.rmtree(os.path.join(run, "step_2"))
    os.remove(os.path.join(run, "final"))
    icrl.main(["--resume", os.path.join(run, "step_1"), "--eval_every", "0"])
    assert icrl.read_trainer_state(os.path.join(run, "final"))["step"] == 2
    assert icrl.resolve_checkpoint(run) == os.path.join(run, "step_2")


@pytest.mark.parametrize("extra, names", [
    (["--out", "elsewhere"], ["--out", "elsewhere"]),
    (["--steps", "1"], ["--steps", "1", "2"]),
    (["--lr", "0.001"], ["--lr", "0.001", "0.0005"]),
    (["--task", "countdown", "--steps", "3"], ["--task", "countdown", "arithmetic"]),
    (["--group_size", "4", "--steps", "3"], ["--group_size", "4", "2"]),
    (["--seed", "1", "--steps", "3"], ["--seed", "1", "0"]),
    (["--overwrite"], ["--overwrite", "--resume"]),
])
def test_resume_refuses_settings_that_do_not_continue_the_run(base_run, tmp_path, monkeypatch, capsys, no_model,
                                                              extra, names):
    run = copy_run(base_run, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    before = open(os.path.join(run, "metrics.jsonl")).read()
    err = usage_error(capsys, ["--resume", run] + extra)
    assert all(name in err for name in names), err
    assert open(os.path.join(run, "metrics.jsonl")).read() == before


def test_resume_refusals_name_what_is_wrong(base_run, tmp_path, monkeypatch, capsys, no_model):
    run = copy_run(base_run, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    # an earlier checkpoint of a run that went further: continuing it would overwrite the later ones
    err = usage_error(capsys, ["--resume", os.path.join(run, "step_1"), "--steps", "4"])
    assert "step_1" in err and "step_2" in err
    err = usage_error(capsys, ["--resume", str(tmp_path / "nowhere")])
    assert "--resume" in err and "nowhere" in err
    # a finished run resumed without a larger --steps has nothing to do, and says so
    icrl.main(["--resume", run])
    assert "already at step 2" in capsys.readouterr().out
    # settings that may change on resume are listed in --help
    with pytest.raises(SystemExit) as e:
        icrl.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "may change on resume" in help_text
    for flag in ("--steps", "--eval_every", "--save_every", "--micro_batch", "--rollout_batch", "--compile_sampler",
                 "--overwrite"):
        assert flag in help_text


def test_a_run_folder_without_latest_names_its_newest_checkpoint(base_run, tmp_path, monkeypatch, capsys, no_model):
    """A kill after the first checkpoint's rename but before `latest` was written: the error names the
    checkpoint to resume."""
    run = copy_run(base_run, tmp_path / "a")
    os.remove(os.path.join(run, "latest"))
    err = usage_error(capsys, ["--resume", run])
    assert f"--resume {os.path.join(run, 'step_2')}" in err, err
    # a half-saved newer one (a kill before its rename) is never the one named
    shutil.copytree(os.path.join(run, "step_2"), os.path.join(run, ".tmp-step_3"))
    state_path = os.path.join(run, ".tmp-step_3", icrl.TRAINER_STATE)
    json.dump(dict(json.load(open(state_path)), step=3), open(state_path, "w"))
    err = usage_error(capsys, ["--resume", run])
    assert f"--resume {os.path.join(run, 'step_2')}" in err, err


def test_resume_can_turn_the_boolean_settings_that_may_change_off(base_run, tmp_path):
    """--fsdp, --grad_ckpt and --compile_sampler may change on resume: a run saved with them resumes with them,
    and --no-fsdp, --no-grad_ckpt, --no-compile_sampler turn them off (else only turning on was possible)."""
    run = copy_run(base_run, tmp_path / "a")
    state_path = os.path.join(run, "final", icrl.TRAINER_STATE)
    state = json.load(open(state_path))
    state["args"].update(fsdp=True, grad_ckpt=True, compile_sampler=True)
    json.dump(state, open(state_path, "w"))
    kept = icrl.parse_args(["--resume", run, "--steps", "3"])
    assert (kept.fsdp, kept.grad_ckpt, kept.compile_sampler) == (True, True, True)
    off = icrl.parse_args(["--resume", run, "--steps", "3", "--no-fsdp", "--no-grad_ckpt", "--no-compile_sampler"])
    assert (off.fsdp, off.grad_ckpt, off.compile_sampler) == (False, False, False)


def test_overwrite_keeps_the_model_folder_and_a_resume_reads_its_own_tokenizer(base_run, tmp_path, monkeypatch):
    """--overwrite clears the old run's checkpoints but never the --model folder the new run starts from (README:
    variants start RL from RUN/warm_start), and the new run resumes with the tokenizer its checkpoints saved,
    whatever became of --model."""
    run = copy_run(base_run, tmp_path / "a")
    model_folder = os.path.join(run, "warm_start")   # a run's RL starting point, as make compare's variants use it
    shutil.copytree(os.path.join(run, "step_1"), model_folder)
    other = os.path.join(run, "checkpoint-500")   # another trainer's checkpoint (it too has a trainer_state.json)
    os.makedirs(other)
    open(os.path.join(other, icrl.TRAINER_STATE), "w").write('{"global_step": 500}')
    icrl.main(FAST + ["--model", model_folder, "--steps", "1", "--out", run, "--overwrite"])
    assert icrl.read_trainer_state(model_folder)["step"] == 1   # the starting point is still there, untouched
    assert not os.path.exists(os.path.join(run, "step_2"))      # the old run's other checkpoints are gone
    assert os.path.isfile(os.path.join(other, icrl.TRAINER_STATE))   # what is not this trainer's stays
    shutil.rmtree(model_folder)   # --model gone: the run still resumes, from its own checkpoint's tokenizer
    icrl.main(["--resume", run, "--steps", "2"])
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_overwrite_refuses_to_save_over_its_model_folder(base_run, tmp_path, monkeypatch, capsys, no_model):
    """A --model folder inside --out that the new run would save a checkpoint over (its final step_N, a
    --save_every step, its warm_start) is refused in one line before the model loads, and nothing is removed."""
    run = copy_run(base_run, tmp_path / "a")
    before = sorted(os.listdir(run))
    for model, extra in [("step_1", ["--steps", "1"]), ("final", ["--steps", "2"]),
                         ("step_1", ["--steps", "3", "--save_every", "1"])]:
        err = usage_error(capsys, FAST + ["--model", os.path.join(run, model), "--out", run, "--overwrite"] + extra)
        assert "--model" in err and "over it" in err, err
        assert sorted(os.listdir(run)) == before
    # --steps 0 after a warm start saves no step_0 (final is the warm start): a --model step_0 is not in its way
    shutil.copytree(os.path.join(run, "step_1"), os.path.join(run, "step_0"))
    with pytest.raises(ModelLoaded):
        icrl.main(FAST + ["--model", os.path.join(run, "step_0"), "--out", run, "--overwrite", "--steps", "0",
                          "--warm_start_steps", "2"])


def test_fresh_run_refuses_a_non_empty_out_unless_overwrite(base_run, tmp_path, monkeypatch, capsys):
    run = copy_run(base_run, tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    (tmp_path / "a" / "eval").mkdir()   # make eval's output (eval.py --out RUN/eval): the old run's figures
    (tmp_path / "a" / "eval" / "summary.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(run))
    err = usage_error(capsys, FAST + ["--steps", "1", "--out", run])
    assert "--overwrite" in err and run in err
    assert sorted(os.listdir(run)) == before
    icrl.main(FAST + ["--steps", "0", "--out", run, "--overwrite"])
    # the old run is gone (its checkpoints and metrics), other files stay
    assert sorted(os.listdir(run)) == ["final", "latest", "notes.txt", "step_0"]


def test_a_run_of_no_rl_step_keeps_one_copy_of_its_warm_start(tmp_path):
    """--steps 0 after a warm start (make compare's starting points): `final` is the warm start's checkpoint,
    not a second copy of the same weights and optimizer state (for Qwen3-8B, tens of GB)."""
    run = str(tmp_path / "w")
    icrl.main(TINY_RUN + ["--warm_start_steps", "2", "--warm_start_role_steps", "1", "--steps", "0", "--out", run,
                          "--eval_examples", "1", "--eval_samples", "1"])
    assert sorted(os.listdir(run)) == ["final", "latest", "warm_start"]
    assert os.path.realpath(os.path.join(run, "final")) == os.path.realpath(os.path.join(run, "warm_start"))
    assert icrl.latest_name(run) == "warm_start" and icrl.read_trainer_state(os.path.join(run, "final"))["step"] == 0


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path, capsys):
    line = icrl.metrics_line({"step": 1, "loss": float("nan"), "tok_per_s": float("inf"), "x": [float("-inf"), 1.5]})
    strict = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert strict == {"step": 1, "loss": None, "tok_per_s": None, "x": [None, 1.5]}
    path = tmp_path / "metrics.jsonl"
    good = ['{"step": 1, "acc": 0.5}\n', '{"step": 2, "acc": null}\n', '{"step": 3, "acc": 0.25}\n']
    path.write_text("".join(good) + '{"step": 4, "ac')
    icrl.keep_metrics_until(str(path), 3)
    assert path.read_text() == "".join(good)
    err = capsys.readouterr().err
    assert "warning" in err and str(path) in err and "torn" in err
    path.write_text(good[0] + "garbage\n" + good[2])   # damage in the middle is not a torn write
    with pytest.raises(icrl.UsageError, match=f"{path}:2"):
        icrl.keep_metrics_until(str(path), 3)


def test_metrics_written_by_a_run_are_strict_json(base_run):
    for line in open(os.path.join(base_run, "metrics.jsonl")):
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


# ==================================================================================================
# 2. Every flag and data file is checked before the model loads
# ==================================================================================================

@pytest.mark.parametrize("extra, flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--group_size", "0"], "--group_size"), (["--micro_batch", "0"], "--micro_batch"),
    (["--batch_prompts", "0"], "--batch_prompts"), (["--minibatch", "0"], "--minibatch"),
    (["--rounds", "0"], "--rounds"), (["--steps", "-1"], "--steps"), (["--save_every", "-2"], "--save_every"),
    (["--max_new_tokens", "0"], "--max_new_tokens"), (["--eval_samples", "0"], "--eval_samples"),
    (["--group_size", "1", "--algo", "grpo"], "--group_size"), (["--group_size", "abc"], "--group_size"),
    (["--calib_clip", "nan"], "--calib_clip"), (["--top_p", "0"], "--top_p"), (["--temperature", "0"], "--temperature"),
    (["--batch_prompts", "6", "--minibatch", "4"], "--minibatch"),
    (["--task_knob", "digits=abc"], "digits"), (["--task_knob", "colour=red"], "colour"),
    (["--task_knob", "nonsense"], "--task_knob"),
    (["--task", "gsm8k", "--train_file", "missing.jsonl", "--eval_file", "missing.jsonl"], "missing.jsonl"),
    (["--task", "nosuchtask"], "nosuchtask"),
])
def test_bad_flags_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model, extra, flag):
    monkeypatch.chdir(tmp_path)
    err = usage_error(capsys, FAST + extra)
    assert flag in err, err


def test_an_out_that_cannot_be_a_folder_fails_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model):
    (tmp_path / "afile").write_text("")
    err = usage_error(capsys, FAST + ["--out", str(tmp_path / "afile" / "run")])
    assert "--out" in err and "afile" in err


def test_fsdp_without_torchrun_fails_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model):
    """A resumed --fsdp run inherits fsdp; one process without torchrun has no process group to shard over."""
    monkeypatch.delenv("RANK", raising=False)
    err = usage_error(capsys, FAST + ["--fsdp", "--out", str(tmp_path / "run")])
    assert "--fsdp" in err and "torchrun" in err and "--no-fsdp" in err


def test_every_rank_gets_the_same_share_of_a_warm_start_batch():
    """--warm_start_batch is split over the ranks like --batch_prompts: on 2 ranks 3 would leave one example out
    (and 1 would leave none per rank); refused in one line, where a warm start runs."""
    for batch, steps, refused in [(3, 5, True), (1, 5, True), (4, 5, False), (3, 0, False)]:
        args = icrl.parse_args(["--warm_start_batch", str(batch), "--warm_start_steps", str(steps)])
        if refused:
            with pytest.raises(icrl.UsageError, match=f"--warm_start_batch {batch}"):
                icrl.check_divisibility(args, icrl.Dist(rank=0, world=2))
        else:
            icrl.check_divisibility(args, icrl.Dist(rank=0, world=2))


def test_warm_start_role_steps_default_to_the_tasks_own():
    """A task may need a longer role phase of the warm start (boxes, the default: 400); a given flag wins."""
    assert icrl.parse_args([]).warm_start_role_steps == 400
    assert icrl.parse_args(["--task", "arithmetic"]).warm_start_role_steps == 100
    assert icrl.parse_args(["--task", "boxes"]).warm_start_role_steps == 400
    assert icrl.parse_args(["--task", "boxes", "--warm_start_role_steps", "7"]).warm_start_role_steps == 7
    assert icrl.parse_args(["--task", "nosuchtask"]).warm_start_role_steps == 100   # load_tasks names it later


def test_rl_steps_default_to_the_tasks_own():
    """boxes (the default) learns to read its notes over 150 RL steps, the others get 60; a given flag wins."""
    assert icrl.parse_args([]).steps == 150
    assert icrl.parse_args(["--task", "arithmetic"]).steps == 60
    assert icrl.parse_args(["--task", "guess"]).steps == 60
    assert icrl.parse_args(["--task", "boxes"]).steps == 150
    assert icrl.parse_args(["--task", "boxes", "--steps", "7"]).steps == 7
    assert icrl.parse_args(["--task", "boxes", "--steps", "0"]).steps == 0   # a warm start alone


def test_unknown_knob_lists_the_valid_ones(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    err = usage_error(capsys, FAST + ["--task_knob", "colour=red"])
    assert all(knob in err for knob in ("digits", "operands", "ops", "n")), err
    err = usage_error(capsys, FAST + ["--task", "guess", "--task_knob", "max_guess=3"])
    assert "max_guesses" in err and "hints" in err, err
    err = usage_error(capsys, FAST + ["--task_knob", "digits=abc"])
    assert "integer" in err, err


def test_bad_data_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"\n')
    err = usage_error(capsys, FAST + ["--task", "gsm8k", "--train_file", str(good), "--eval_file", str(bad)])
    assert f"{bad}:2" in err, err


def test_group_size_one_is_warned_about_for_icrl(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoaded):
        icrl.main(FAST + ["--group_size", "1"])
    err = capsys.readouterr().err
    assert "warning" in err and "--group_size 1" in err


def test_a_user_error_on_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "icrl.py"), "--lr", "nan"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--lr" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")
    # under torchrun every rank finds the mistake and rank 0 alone says it (torchrun then adds its own report)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "icrl.py"), "--lr", "nan"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and result.stderr.count("error: --lr") == 1, result.stderr


# ==================================================================================================
# 3. Prompts longer than the model's context
# ==================================================================================================

def gsm8k_file(path, questions):
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"question": q, "answer": "#### 2"}) + "\n")
    return str(path)


def test_over_long_prompts_are_dropped_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model):
    """The tiny model has 2048 positions and one token per character: a 3,000-character question cannot
    fit, and a 50 MB one must be rejected on its length alone, never reaching the tokenizer."""
    import transformers
    real = transformers.PreTrainedTokenizerBase.apply_chat_template

    def bounded(self, conversation, *args, **kwargs):
        assert sum(len(m["content"]) for m in conversation) < 100_000, "a huge prompt reached the tokenizer"
        return real(self, conversation, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "apply_chat_template", bounded)
    monkeypatch.chdir(tmp_path)
    train = gsm8k_file(tmp_path / "train.jsonl", ["What is 1+1?", "x" * 3000, "y" * 50_000_000, "What is 0+2?"])
    test = gsm8k_file(tmp_path / "test.jsonl", ["What is 2+0?", "z" * 2500])
    with pytest.raises(ModelLoaded):
        icrl.main(FAST + ["--task", "gsm8k", "--train_file", train, "--eval_file", test])
    err = capsys.readouterr().err
    assert "dropped 2 of 4" in err and f"{train}:2" in err and f"{train}:3" in err, err
    assert "dropped 1 of 2" in err and f"{test}:2" in err, err
    # --max_prompt_tokens sets a tighter limit (S(x) of "What is 1+1?" is 21 tokens here) ...
    small = gsm8k_file(tmp_path / "small.jsonl", ["What is 1+1?", "w" * 60, "What is 0+2?"])
    with pytest.raises(ModelLoaded):
        icrl.main(FAST + ["--task", "gsm8k", "--train_file", small, "--eval_file", small, "--max_prompt_tokens", "40"])
    err = capsys.readouterr().err
    assert "dropped 1 of 3" in err and f"{small}:2" in err, err
    # ... and is refused beyond what the model holds
    err = usage_error(capsys, FAST + ["--task", "gsm8k", "--train_file", small, "--eval_file", small,
                                      "--max_prompt_tokens", "5000"])
    assert "--max_prompt_tokens" in err and "2048" in err, err
    # nothing left to train on: refused
    only_long = gsm8k_file(tmp_path / "long.jsonl", ["x" * 3000])
    err = usage_error(capsys, FAST + ["--task", "gsm8k", "--train_file", only_long, "--eval_file", small])
    assert "--max_prompt_tokens" in err and only_long in err, err


# ==================================================================================================
# 4. Bad checkpoints: one line naming the file
# ==================================================================================================

def checkpoint_folder(tmp_path, name, tokenizer=True):
    from conftest import make_hf_qwen3
    from data import build_char_tokenizer
    folder, _ = make_hf_qwen3(tmp_path / name, vocab_size=116)
    if tokenizer:
        build_char_tokenizer(str(folder))
    return str(folder)


def test_bad_model_folders_give_one_line(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    args = FAST + ["--warm_start_steps", "0"]
    folder = checkpoint_folder(tmp_path, "no_tokenizer", tokenizer=False)
    err = usage_error(capsys, args + ["--model", folder])
    assert folder in err and "tokenizer" in err, err

    folder = checkpoint_folder(tmp_path, "no_template")
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    del config["chat_template"]
    json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    err = usage_error(capsys, args + ["--model", folder])
    assert folder in err and "chat template" in err, err

    folder = checkpoint_folder(tmp_path, "truncated")
    weights = os.path.join(folder, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:len(data) // 2])
    err = usage_error(capsys, args + ["--model", folder])
    assert weights in err, err

    folder = checkpoint_folder(tmp_path, "bad_config")
    open(os.path.join(folder, "config.json"), "w").write("{not json")
    err = usage_error(capsys, args + ["--model", folder])
    assert os.path.join(folder, "config.json") in err, err


@pytest.mark.parametrize("key, value", [("lr", "abc"), ("fsdp", "false"), ("group_size", 2.5), ("algo", "ppo"),
                                        ("task_knob", "n=3"), ("micro_batch", True)])
def test_a_saved_setting_of_the_wrong_type_gives_one_line(base_run, tmp_path, monkeypatch, capsys, no_model, key, value):
    """A hand-edited trainer_state.json: a setting its flag would not take is one line naming the file and
    the setting, never a traceback or a string "false" read as true."""
    run = copy_run(base_run, tmp_path / "a")
    file = os.path.join(run, "step_2", icrl.TRAINER_STATE)
    state = json.load(open(file))
    state["args"][key] = value
    json.dump(state, open(file, "w"))
    err = usage_error(capsys, ["--resume", run, "--steps", "3"])
    assert file in err and key in err, err


@pytest.mark.parametrize("target, damage", [
    (icrl.TRAINER_STATE, "garbage"), (icrl.TRAINER_STATE, "truncated"), (icrl.TRAINER_STATE, "missing"),
    (icrl.OPTIMIZER, "missing"), (f"{icrl.OPTIMIZER}/.metadata", "garbage"),
    (f"{icrl.OPTIMIZER}/.metadata", "truncated"), (f"{icrl.OPTIMIZER}/__0_0.distcp", "truncated"),
    (f"{icrl.OPTIMIZER}/__0_0.distcp", "missing"),
])
def test_corrupted_trainer_state_gives_one_line(base_run, tmp_path, monkeypatch, capsys, no_model, target, damage):
    """The step and settings (trainer_state.json) or the optimizer folder (DCP's .metadata, a rank's file)
    missing, cut short or overwritten: one line naming it, before the model loads."""
    run = copy_run(base_run, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    state = os.path.join(run, "step_2", target)
    if damage == "missing":
        icrl.remove_path(state)
    else:
        data = open(state, "rb").read()
        open(state, "wb").write(b"not a checkpoint file" if damage == "garbage" else data[:len(data) // 2])
    err = usage_error(capsys, ["--resume", run, "--steps", "3"])
    assert state in err or os.path.join(run, "final", target) in err, err


def test_a_damaged_optimizer_file_of_the_right_length_gives_one_line(base_run, tmp_path):
    """What the cheap check before the model loads cannot see (a file overwritten in place) stops the load
    of the optimizer state in one line naming its folder."""
    run = copy_run(base_run, tmp_path / "a")
    checkpoint = os.path.join(run, "step_2")
    shard = os.path.join(checkpoint, icrl.OPTIMIZER, "__0_0.distcp")
    size = os.path.getsize(shard)
    open(shard, "wb").write(bytes(size))
    assert icrl.read_trainer_state(checkpoint)["step"] == 2
    model = icrl.Qwen3.from_pretrained(checkpoint)
    with pytest.raises(icrl.UsageError, match=os.path.join(checkpoint, icrl.OPTIMIZER)) as e:
        icrl.load_optimizer(model, torch.optim.AdamW(model.parameters()), checkpoint)
    assert "\n" not in str(e.value)


def test_an_old_layout_checkpoint_is_refused_in_one_line(base_run, tmp_path, monkeypatch, capsys, no_model):
    """A checkpoint of the layout before (the whole optimizer in trainer_state.pt) names what it is and what
    to do; its weights still start a new run (--model)."""
    run = copy_run(base_run, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    checkpoint = os.path.join(run, "step_2")
    icrl.remove_path(os.path.join(checkpoint, icrl.OPTIMIZER))
    os.rename(os.path.join(checkpoint, icrl.TRAINER_STATE), os.path.join(checkpoint, "trainer_state.pt"))
    for resume in (run, checkpoint):
        err = usage_error(capsys, ["--resume", resume, "--steps", "3"])
        assert checkpoint in err and "trainer_state.pt" in err and "older icrl.py" in err and "--model" in err, err


# ==================================================================================================
# 5. Checkpoints that work everywhere
# ==================================================================================================

def test_checkpoint_stops_under_transformers_generate_like_ours(tmp_path, char_tokenizer):
    """config.json and generation_config.json carry <|im_end|> and <|endoftext|>: `generate` with its
    defaults stops where our greedy sampler does. Files are 0644 (under umask 022), weights included."""
    from transformers import AutoModelForCausalLM
    from model import Qwen3, Qwen3Config, generate
    from data import solver_context
    stops = icrl.stop_token_ids(char_tokenizer)
    im_end = char_tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(vocab_size=len(char_tokenizer), **{**icrl.TINY_CONFIG, "tie_word_embeddings": False}))
    prompts = [solver_context(char_tokenizer, f"{a}+{b}\nAnswer in \\boxed{{}}.", "") for a in range(3) for b in range(3)]
    original = model.lm_head.weight[im_end].clone()
    found = None
    # A random model never stops by itself: make <|im_end|>'s output row a copy (x 1.1) of the row of a token
    # that greedy decoding picks a few tokens in, so that it stops there instead.
    for prompt in prompts:
        with torch.no_grad():
            model.lm_head.weight[im_end] = original
        free = generate(model, [prompt], 24, temperature=0)[0].tokens
        for k in range(2, 12):
            if free[k] in free[:k]:
                continue
            with torch.no_grad():
                model.lm_head.weight[im_end] = model.lm_head.weight[free[k]] * 1.1
            out = generate(model, [prompt], 24, temperature=0, stop_ids=stops)[0]
            if out.finished and len(out.tokens) >= 3:
                found = prompt, out.tokens
                break
        if found:
            break
    assert found, "no prompt stopped early"
    prompt, ours = found
    args = icrl.parse_args(["--out", str(tmp_path / "run")])
    optimizer = torch.optim.AdamW(model.parameters())
    old_umask = os.umask(0o022)
    try:
        icrl.save_checkpoint(model, optimizer, char_tokenizer, args, icrl.Dist(), 0, "warm_start")
    finally:
        os.umask(old_umask)
    folder = tmp_path / "run" / "warm_start"
    assert json.load(open(folder / "config.json"))["eos_token_id"] == im_end
    generation = json.load(open(folder / "generation_config.json"))
    assert sorted(generation["eos_token_id"]) == stops
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24)[0, len(prompt):].tolist()
    assert theirs == ours
    for root, folders, files in os.walk(folder):  # optimizer/ too: its folder 0755, DCP's files 0644
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name
        for name in folders:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o755, name


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    from data import build_char_tokenizer
    path = str(tmp_path_factory.mktemp("tok"))
    build_char_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


# ==================================================================================================
# 7. A kill at any point of a save leaves a loadable `latest`
# ==================================================================================================

class Killed(BaseException):
    pass


def loadable(folder, tokenizer_vocab):
    """A whole checkpoint: weights, tokenizer, step and the optimizer state as a resume reads them."""
    from transformers import AutoTokenizer
    model = icrl.Qwen3.from_pretrained(folder)
    state = icrl.read_trainer_state(folder)
    icrl.load_optimizer(model, torch.optim.AdamW(model.parameters()), folder)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer_vocab
    return model, state["step"]


@pytest.mark.parametrize("name", ["final", "step_2"])
def test_a_kill_at_every_point_of_a_save_leaves_a_loadable_latest(tmp_path, monkeypatch, char_tokenizer, name):
    """A run saved `final` at step 1; the next save (step 2, as `final` or as an intermediate checkpoint)
    is killed before its k-th file-system operation, for every k (some inside DCP's writes of optimizer/):
    `latest` (and `final`) always name a whole checkpoint, its optimizer state loadable, at step 1 or 2, and
    the next save after the kill succeeds."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this test is about; speed is
    save_optimizer, in_optimizer, killed_in_optimizer = icrl.save_optimizer, [False], []

    def tracked_save_optimizer(*a, **kw):
        in_optimizer[0] = True
        try:
            return save_optimizer(*a, **kw)
        finally:
            in_optimizer[0] = False

    monkeypatch.setattr(icrl, "save_optimizer", tracked_save_optimizer)
    model = tiny_model(len(char_tokenizer))
    optimizer = torch.optim.AdamW(model.parameters())
    pristine = str(tmp_path / "pristine")
    args = icrl.parse_args(["--out", pristine])
    icrl.save_checkpoint(model, optimizer, char_tokenizer, args, icrl.Dist(), 1, "final")
    vocab = char_tokenizer.get_vocab()
    operations = ["mkdir", "replace", "rename", "symlink", "unlink", "remove", "rmdir"]  # every change a reader sees
    real = {op: getattr(os, op) for op in operations}
    real_rmtree = shutil.rmtree
    k, outcomes = 0, set()
    while True:
        k += 1
        out = str(tmp_path / f"run{k}")
        shutil.copytree(pristine, out, symlinks=True)
        args.out = out
        calls = [0]

        def counted(fn):
            def wrapper(*a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    killed_in_optimizer.append(in_optimizer[0])
                    raise Killed
                return fn(*a, **kw)
            return wrapper

        for op in operations:
            monkeypatch.setattr(os, op, counted(real[op]))
        monkeypatch.setattr(shutil, "rmtree", counted(real_rmtree))
        try:
            icrl.save_checkpoint(model, optimizer, char_tokenizer, args, icrl.Dist(), 2, name)
            finished = True
        except Killed:
            finished = False
        except CheckpointException as e:  # DCP hands on what stopped it, wrapped
            assert [type(error) for error, _ in e.failures.values()] == [Killed], e
            finished = False
        finally:
            for op in operations:
                monkeypatch.setattr(os, op, real[op])
            monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        _, step = loadable(icrl.resolve_checkpoint(out), vocab)
        _, final_step = loadable(os.path.join(out, "final"), vocab)
        outcomes.add((step, final_step))
        assert step in (1, 2) and final_step in (1, 2)
        if finished:
            assert step == 2 and final_step == (2 if name == "final" else 1)
            break
        icrl.save_checkpoint(model, optimizer, char_tokenizer, args, icrl.Dist(), 2, name)  # the rerun heals it
        assert loadable(icrl.resolve_checkpoint(out), vocab)[1] == 2
        real_rmtree(out)
    assert k > (6 if name == "final" else 4) and (1, 1) in outcomes, (k, outcomes)
    assert any(killed_in_optimizer) and not all(killed_in_optimizer)


def test_a_fresh_optimizer_saved_takes_a_first_step_and_so_does_its_load(tmp_path):
    """The warm_start checkpoint is saved before RL's first update. DCP's state dict of a fresh AdamW gives it
    state (an optimizer step at lr 0); the save must undo that, or RL's first update would be ~0.74 of a first
    Adam step and `make train` would differ from a run started with --model warm_start. Loaded back (a resume
    from that checkpoint), the state must give a first step too (bias corrections of step 1)."""
    models = [tiny_model(50) for _ in range(3)]   # saved, loaded from the save, never saved
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    icrl.save_optimizer(models[0], optimizers[0], str(tmp_path / icrl.OPTIMIZER))
    assert not optimizers[0].state and (tmp_path / icrl.OPTIMIZER / ".metadata").is_file()
    icrl.load_optimizer(models[1], optimizers[1], str(tmp_path))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    for m, opt in zip(models, optimizers):
        m(ids).float().square().mean().backward()
        opt.step()
    for saved, loaded, never in zip(*(m.parameters() for m in models)):
        assert torch.equal(saved, never) and torch.equal(loaded, never)


def test_a_failing_rank_stops_the_run_with_its_error_instead_of_hanging(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the run ends (torchrun stops rank 0), nonzero, with
    rank 1's error in the output, instead of rank 1 waiting forever at its shutdown barrier."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_fail.py"), "icrl", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "rank 1 fails here" in result.stdout + result.stderr


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp"])
def test_a_server_failing_on_one_rank_stops_every_rank_with_the_steps_saved(tmp_path, wrapping):
    """2 ranks: rank 1's training server fails for good in step 2. Both ranks stop together (no hang, no
    traceback), step 1 saved, exit status 1, and one line names the failing rank's call and the resume."""
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_fail.py"), "server", run] + (["--fsdp"] if wrapping == "fsdp" else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "icrl.py\", line" not in output, output[-3000:]   # (torchrun's own report aside)
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "error: step 2: rank 1: agentgym:alfworld: POST" in errors[0], output[-3000:]
    assert f"its 1 step saved: --resume {run}" in errors[0]
    assert icrl.latest_name(run) == "step_1" and icrl.read_trainer_state(os.path.join(run, "step_1"))["step"] == 1


def test_a_failed_evaluation_server_costs_its_figures_not_the_run(tmp_path, monkeypatch, capsys):
    """An environment server of the held-out evaluation that fails for good (AgentGym's, after its retry) leaves
    that evaluation's figures null; training goes on and saves its checkpoints (a run of hours is not lost)."""
    import data
    real = icrl.rollout

    def rollout(*args, critique=True, **kwargs):   # training samples critiques; the held-out evaluation does not
        if not critique:
            raise data.EnvironmentServerFailed("agentgym:alfworld: POST http://127.0.0.1:1/step: no reply within 1 s")
        return real(*args, critique=critique, **kwargs)

    monkeypatch.setattr(icrl, "rollout", rollout)
    run = str(tmp_path / "r")
    icrl.main(FAST + ["--steps", "2", "--eval_every", "1", "--out", run])
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2] and all(r["eval_acc"] is None for r in lines)
    assert icrl.read_trainer_state(os.path.join(run, "final"))["step"] == 2
    err = capsys.readouterr().err
    assert "held-out evaluation failed" in err and "no reply within 1 s" in err


def test_a_training_server_that_fails_for_good_stops_the_run_with_its_steps_saved(tmp_path, monkeypatch, capsys):
    """An environment server of the training task that fails for good (AgentGym's, after its retry) stops the run
    at once, every rank together, with the steps done saved (whatever --save_every says) and one line saying
    how to go on: a resume then continues as if nothing had happened."""
    import data
    real, calls = icrl.rollout, []

    def rollout(*args, critique=True, **kwargs):   # the third training step's rollout fails
        if critique:
            calls.append(1)
            if len(calls) == 3:
                raise data.EnvironmentServerFailed("agentgym:alfworld: POST http://127.0.0.1:1/step: no reply within 1 s")
        return real(*args, critique=critique, **kwargs)

    monkeypatch.setattr(icrl, "rollout", rollout)
    run = str(tmp_path / "r")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        icrl.main(FAST + ["--steps", "4", "--out", run])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 3: agentgym:alfworld: POST") and f"2 steps saved: --resume {run}" in err[-1], err
    assert icrl.latest_name(run) == "step_2" and icrl.read_trainer_state(os.path.join(run, "step_2"))["step"] == 2
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    monkeypatch.setattr(icrl, "rollout", real)
    icrl.main(["--resume", run, "--steps", "4"])
    assert icrl.read_trainer_state(os.path.join(run, "final"))["step"] == 4
    straight = str(tmp_path / "straight")   # the same run, never stopped: the same weights, bit for bit
    icrl.main(FAST + ["--steps", "4", "--out", straight])
    a, b = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (run, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_server_that_fails_in_the_warm_start_stops_it_in_one_line(tmp_path, monkeypatch, capsys):
    """During the warm start (its probe or its own attempts) a failed server stops the run in one line, exit
    status 1: nothing was saved, so it is run again."""
    import data

    def rollout(*args, **kwargs):
        raise data.EnvironmentServerFailed("agentgym:alfworld: POST http://127.0.0.1:1/reset: no reply within 1 s")

    monkeypatch.setattr(icrl, "rollout", rollout)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        icrl.main(TINY_RUN + ["--steps", "2", "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the warm start: ") and "failed for good" in err[-1] and "run it again" in err[-1]
    assert "no reply within 1 s" in err[-2]   # the warning that names the failed call
