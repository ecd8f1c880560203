"""tests/compare.py (make compare): the summary's statistics on made-up run folders, worked by hand; the
skip of complete runs (the subprocess runner replaced by a recorder); a 2-variant x 1-seed comparison of
a few steps end to end."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

STEPS = 2


def write_run(folder, steps=STEPS, curve=None, start=None, eval_summary=None, wall=None, warm=False):
    """A made-up run folder: final/ (and warm_start/), metrics.jsonl up to `steps` with eval_acc from
    `curve` ({step: value}), the 'when RL begins' line in train.log, eval/summary.json, compare_run.json."""
    os.makedirs(os.path.join(folder, "final"), exist_ok=True)
    if warm:
        os.makedirs(os.path.join(folder, "warm_start"), exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "acc": 0.5}
            if curve and step in curve:
                row["eval_acc"] = curve[step]
            f.write(json.dumps(row) + "\n")
    if start is not None:
        with open(os.path.join(folder, "train.log"), "w") as f:
            f.write("warm start: 3 supervised steps in 2s\nheld-out critique-free accuracy when RL begins (step 0"
                    f", after the warm start): pass@1 {start:.3f} (4 samples each), greedy 0.500\n")
    if eval_summary is not None:
        os.makedirs(os.path.join(folder, "eval"), exist_ok=True)
        with open(os.path.join(folder, "eval", "summary.json"), "w") as f:
            json.dump(eval_summary, f)
    if wall is not None:   # as Runner writes it, on the current code
        with open(os.path.join(folder, "compare_run.json"), "w") as f:
            json.dump({"cmd": [], "attempts": [wall], "wall_s": wall, "eval_wall_s": 1.0,
                       "code": compare.code_version(), "eval_code": compare.code_version()}, f)


def ev(pass1, cv, r2):
    return {"pass@1": pass1, "critique_value": cv, "acc_round_2": r2}


@pytest.fixture
def made_up(tmp_path):
    out = tmp_path / "compare"
    a = out / "arithmetic"
    for seed, p in zip((0, 1, 2), (0.40, 0.30, 0.35)):
        write_run(a / "warm_start" / f"seed{seed}", steps=0, start=p + 0.01, eval_summary=ev(p, -0.2, 0.5),
                  wall=30.0, warm=True)
    # icrl: pass@1 .60 .50 .70; critique_value -.1, null, -.3; acc_round_2 .65 .55 .75; wall 80 90 100
    for seed, (p, cv, r2, w, c1) in enumerate([(0.60, -0.1, 0.65, 80.0, 0.4), (0.50, None, 0.55, 90.0, 0.5),
                                                (0.70, -0.3, 0.75, 100.0, 0.6)]):
        write_run(a / "icrl" / f"seed{seed}", curve={1: c1, 2: p}, start=0.3, eval_summary=ev(p, cv, r2), wall=w)
    for seed, p in enumerate((0.55, 0.58, 0.52)):
        write_run(a / "grpo" / f"seed{seed}", curve={1: 0.5, 2: p}, start=0.3, eval_summary=ev(p, 0.0, p), wall=40.0)
    # one seed only; and an incomplete icrl seed 3 (metrics stop at step 1), which must not count
    write_run(a / "calib_none" / "seed0", curve={2: 0.45}, eval_summary=ev(0.45, None, None), wall=70.0)
    write_run(a / "icrl" / "seed3", steps=1, curve={1: 0.99}, eval_summary=ev(0.99, 0.9, 0.99), wall=1.0)
    os.rmdir(a / "icrl" / "seed3" / "final")
    return out


def test_mean_std_by_hand():
    assert compare.mean_std([0.40, 0.30, 0.35]) == {"mean": pytest.approx(0.35), "std": pytest.approx(0.05), "n": 3}
    assert compare.mean_std([-0.1, None, -0.3]) == {"mean": pytest.approx(-0.2), "std": pytest.approx(2 ** 0.5 / 10),
                                                    "n": 2}
    assert compare.mean_std([0.7]) == {"mean": 0.7, "std": None, "n": 1}
    assert compare.mean_std([None, None]) == {"mean": None, "std": None, "n": 0}


def test_summary_statistics_on_made_up_runs(made_up):
    summary, text, pngs = compare.write_summary(str(made_up), STEPS, plot=False)
    rows = summary["tasks"]["arithmetic"]["rows"]
    assert list(rows) == ["warm_start", "icrl", "grpo", "calib_none"]
    icrl, grpo, calib = rows["icrl"], rows["grpo"], rows["calib_none"]
    assert icrl["seeds"] == [0, 1, 2]  # the incomplete seed 3 is left out
    # when RL began: the seed's warm start, eval.py's pass@1 .40 .30 .35 -> 35 ± 5
    assert icrl["pass1_start"] == {"mean": pytest.approx(0.35), "std": pytest.approx(0.05), "n": 3}
    # at the end .60 .50 .70: deviations 0 -.1 +.1, variance .02 / 2 -> 60 ± 10
    assert icrl["pass1_end"] == {"mean": pytest.approx(0.60), "std": pytest.approx(0.10), "n": 3}
    # gains .20 .20 .35: mean .25, deviations -.05 -.05 +.10, variance .015 / 2 = .0075
    assert icrl["gain"]["mean"] == pytest.approx(0.25) and icrl["gain"]["std"] == pytest.approx(0.0075 ** 0.5)
    # GRPO .55 .58 .52 -> 55 ± 3; per-seed differences .05 -.08 .18: mean .05, deviations 0 -.13 .13 -> std .13
    assert grpo["pass1_end"] == {"mean": pytest.approx(0.55), "std": pytest.approx(0.03), "n": 3}
    assert icrl["diff_grpo"] == {"mean": pytest.approx(0.05), "std": pytest.approx(0.13), "n": 3}
    assert grpo["diff_grpo"] == {"mean": None, "std": None, "n": 0}
    # a null critique_value is left out: (-.1, -.3) -> -.2 ± .1414 over 2
    assert icrl["critique_value"] == {"mean": pytest.approx(-0.2), "std": pytest.approx(0.02 ** 0.5), "n": 2}
    assert icrl["acc_round_2"]["mean"] == pytest.approx(0.65) and icrl["acc_round_2"]["std"] == pytest.approx(0.1)
    assert icrl["wall_s"] == {"mean": pytest.approx(90.0), "std": pytest.approx(10.0), "n": 3}
    assert icrl["eval_acc_start"]["mean"] == pytest.approx(0.3) and icrl["eval_acc_end"]["mean"] == pytest.approx(0.6)
    # one seed: no spread; its difference to GRPO is seed 0's alone; null eval figures stay null
    assert calib["pass1_end"] == {"mean": pytest.approx(0.45), "std": None, "n": 1}
    assert calib["diff_grpo"] == {"mean": pytest.approx(-0.10), "std": None, "n": 1}
    assert calib["critique_value"]["mean"] is None and calib["eval_acc_start"]["mean"] is None
    assert rows["warm_start"]["pass1_end"]["mean"] == pytest.approx(0.35)
    # curves: step 0 from train.log, then eval_acc; step 1 .4 .5 .6 -> .5 ± .1
    curve = summary["tasks"]["arithmetic"]["curves"]["icrl"]
    assert curve["steps"] == [0, 1, 2] and curve["n"] == [3, 3, 3]
    assert curve["mean"] == pytest.approx([0.3, 0.5, 0.6]) and curve["std"][1] == pytest.approx(0.1)
    assert summary["tasks"]["arithmetic"]["curves"]["calib_none"]["steps"] == [2]
    # the table, on stdout and in summary.md, and the JSON written strictly
    assert ("| icrl | 0,1,2 | 35.0 ± 5.0 | 60.0 ± 10.0 | +25.0 ± 8.7 | +5.0 ± 13.0 | -20.0 ± 14.1 (seeds 0,2) | "
            "65.0 ± 10.0 "
            "| 60.0 ± 10.0 | 90 s ± 10 |") in text
    # GRPO's gains .15 .28 .17: mean .20, deviations -.05 +.08 -.03, variance .0098 / 2 -> std .07
    assert "| grpo | 0,1,2 | 35.0 ± 5.0 | 55.0 ± 3.0 | +20.0 ± 7.0 | (baseline) |" in text
    assert "| calib_none | 0 | 40.0 | 45.0 | +5.0 | -10.0 | — | — | 45.0 | 70 s |" in text
    assert (made_up / "summary.md").read_text() == text
    on_disk = json.loads((made_up / "summary.json").read_text())
    assert on_disk["tasks"]["arithmetic"]["rows"]["icrl"]["per_seed"]["1"]["critique_value"] is None
    assert "guess" not in on_disk["tasks"]


def test_plot_writes_png(made_up):
    _, _, pngs = compare.write_summary(str(made_up), STEPS, plot=True)
    assert pngs == ["arithmetic.png"]
    assert (made_up / "arithmetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_runner(calls, nproc="2"):
    """Stands in for the subprocess: records the command and writes what icrl.py / eval.py would."""
    def run(cmd, log_path, env):
        calls.append(cmd)
        assert env["OMP_NUM_THREADS"] == "1"
        if cmd[1].endswith("eval.py"):
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(ev(0.5, 0.0, 0.5), f)
            return 0
        assert "--standalone" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == nproc
        out, steps = cmd[cmd.index("--out") + 1], int(cmd[len(cmd) - cmd[::-1].index("--steps")])
        write_run(out, steps=steps, curve={steps: 0.5}, start=0.25, warm=steps == 0)
        return 0
    return run


def test_complete_runs_are_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "compare" / "arithmetic"
    write_run(out / "warm_start" / "seed0", steps=0, start=0.3, eval_summary=ev(0.3, 0.0, 0.3), warm=True)
    write_run(out / "icrl" / "seed0", curve={2: 0.6}, eval_summary=ev(0.6, 0.0, 0.6))   # complete
    write_run(out / "grpo" / "seed0", steps=1)                                           # interrupted
    os.rmdir(out / "grpo" / "seed0" / "final")
    (out / "grpo" / "seed0" / "stale.txt").write_text("from the interrupted run")
    argv = ["--seeds", "0", "--variants", "icrl", "grpo", "--tasks", "arithmetic", "--steps", str(STEPS),
            "--out", str(tmp_path / "compare"), "--no_plot"]
    assert compare.main(argv) == 0
    # only GRPO ran, from scratch, on the warm start's weights; then its eval
    assert len(calls) == 2
    train, evaluation = calls
    assert train[train.index("--out") + 1] == str(out / "grpo" / "seed0") and "--resume" not in train
    assert train[train.index("--model") + 1] == str(out / "warm_start" / "seed0" / "warm_start")
    assert train[train.index("--algo") + 1] == "grpo" and train[train.index("--warm_start_steps") + 1] == "0"
    assert evaluation[evaluation.index("--model") + 1] == str(out / "grpo" / "seed0" / "final")
    assert not (out / "grpo" / "seed0" / "stale.txt").exists()
    record = json.loads((out / "grpo" / "seed0" / "compare_run.json").read_text())
    assert record["complete"] and len(record["attempts"]) == 1 and record["eval_wall_s"] is not None
    # a second invocation finds everything complete
    calls.clear()
    assert compare.main(argv) == 0 and calls == []


def test_runs_with_other_flags_or_code_and_runs_of_a_redone_warm_start_are_redone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS),
            "--out", str(tmp_path / "c"), "--no_plot", "--icrl_args", "--group_size 2"]
    assert compare.main(argv) == 0 and len(calls) == 4  # warm start, its eval, icrl, its eval
    calls.clear()
    assert compare.main(argv) == 0 and calls == []
    # other icrl.py flags: the warm start is redone, and with it the variant and both evaluations
    assert compare.main(argv[:-1] + ["--group_size 4"]) == 0 and len(calls) == 4
    assert all("4" == c[c.index("--group_size") + 1] for c in calls if "--group_size" in c)
    calls.clear()
    # only the evaluation flags changed: only the evaluations are redone
    assert compare.main(argv[:-1] + ["--group_size 4", "--eval_args", "--n 2"]) == 0
    assert [c[1].endswith("eval.py") for c in calls] == [True, True]
    calls.clear()
    # other code (icrl.py, model.py, data.py or eval.py changed): every run and evaluation is redone
    monkeypatch.setattr(compare, "code_version", lambda: "changed")
    assert compare.main(argv[:-1] + ["--group_size 4", "--eval_args", "--n 2"]) == 0 and len(calls) == 4


def test_a_complete_run_whose_record_lacks_its_setting_is_redone(tmp_path, monkeypatch):
    """A record with its evaluation's fields alone says nothing of the code that trained the run: redone; a
    run with no record at all (made by hand) is trusted."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "compare" / "arithmetic"
    write_run(out / "warm_start" / "seed0", steps=0, start=0.3, eval_summary=ev(0.3, 0.0, 0.3), warm=True)
    write_run(out / "icrl" / "seed0", curve={2: 0.6}, eval_summary=ev(0.6, 0.0, 0.6))
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS),
            "--out", str(tmp_path / "compare"), "--no_plot"]
    assert compare.main(argv) == 0 and calls == []          # no records: trusted, nothing ran
    (out / "warm_start" / "seed0" / "compare_run.json").write_text(json.dumps(
        {"eval_flags": ["--model", "x"], "eval_code": "old", "eval_wall_s": 9.0}))
    assert compare.main(argv) == 0
    trained = [c[c.index("--out") + 1] for c in calls if not c[1].endswith("eval.py")]
    assert trained == [str(out / "warm_start" / "seed0"), str(out / "icrl" / "seed0")]  # and its variant after it


def table_rows(out, task="arithmetic"):
    return list(json.loads((out / "summary.json").read_text())["tasks"].get(task, {}).get("rows", {}))


def test_a_run_from_an_earlier_warm_start_is_left_out_and_redone(tmp_path, monkeypatch, capsys):
    """A partial rerun (--variants icrl) redoes the warm start and icrl but not grpo, which still holds a run
    from the earlier warm start: the table leaves it out, with a line saying why, instead of pairing it with
    the new start; a later --variants grpo redoes it, whichever invocation redid the warm start."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    argv = ["--seeds", "0", "--tasks", "arithmetic", "--steps", str(STEPS), "--out", str(out), "--no_plot"]
    assert compare.main(argv + ["--variants", "icrl", "grpo"]) == 0
    shutil.rmtree(out / "arithmetic" / "warm_start" / "seed0")   # removed, or cut off while being redone
    capsys.readouterr()
    assert compare.main(argv + ["--variants", "icrl"]) == 0
    grpo = out / "arithmetic" / "grpo" / "seed0"
    assert f"left out of the table: {grpo}: trained from an earlier warm start" in capsys.readouterr().out
    assert table_rows(out) == ["warm_start", "icrl"]
    calls.clear()
    assert compare.main(argv + ["--variants", "grpo"]) == 0
    assert [c[c.index("--out") + 1] for c in calls] == [str(grpo), str(grpo / "eval")]
    assert table_rows(out) == ["warm_start", "icrl", "grpo"]


def test_runs_of_other_code_and_evaluations_of_other_flags_are_left_out(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    argv = ["--seeds", "0", "--tasks", "arithmetic", "--steps", str(STEPS), "--out", str(out), "--no_plot"]
    assert compare.main(argv + ["--variants", "icrl", "grpo"]) == 0
    # other eval.py flags for icrl only: the warm start and icrl are evaluated again, grpo keeps its evaluation
    capsys.readouterr()
    assert compare.main(argv + ["--variants", "icrl", "--eval_args", "--n 2"]) == 0
    grpo = out / "arithmetic" / "grpo" / "seed0"
    assert f"left out of the table: {grpo}: evaluated with other eval.py flags than its warm start" in \
        capsys.readouterr().out
    assert table_rows(out) == ["warm_start", "icrl"]
    # the code changed since: every run is left out, each named, and the empty table replaces no table
    before = {name: (out / name).read_text() for name in ("summary.md", "summary.json")}
    monkeypatch.setattr(compare, "code_version", lambda: "changed")
    assert compare.main(argv + ["--summary_only"]) == 1
    printed = capsys.readouterr().out
    for name in ("warm_start", "icrl", "grpo"):
        assert f"left out of the table: {out / 'arithmetic' / name / 'seed0'}: trained by other code" in printed
    assert f"no complete, current run under {out}" in printed
    assert {name: (out / name).read_text() for name in before} == before


def test_a_failed_evaluation_leaves_no_old_figures_and_is_redone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    icrl = out / "arithmetic" / "icrl" / "seed0"
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS), "--out", str(out),
            "--no_plot", "--eval_args", "--n 2"]
    assert compare.main(argv[:-2]) == 0
    real = compare.run_command
    monkeypatch.setattr(compare, "run_command", lambda cmd, log, env: 1 if str(icrl) in cmd[cmd.index("--model") + 1]
                        and cmd[1].endswith("eval.py") else real(cmd, log, env))
    assert compare.main(argv) == 1   # icrl's new evaluation fails: its earlier figures are not shown as new
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["arithmetic"]["rows"]["icrl"]["per_seed"]["0"]["pass1"] is None
    monkeypatch.setattr(compare, "run_command", real)
    calls.clear()
    assert compare.main(argv) == 0 and [c[c.index("--out") + 1] for c in calls] == [str(icrl / "eval")]


def interrupted_run(tmp_path):
    """guess seed 1: a complete warm start, and an icrl run stopped after its step_1 checkpoint (no final/)."""
    out = tmp_path / "c" / "guess"
    write_run(out / "warm_start" / "seed1", steps=0, start=0.3, eval_summary=ev(0.3, 0.0, 0.3), warm=True)
    run = out / "icrl" / "seed1"
    write_run(run, steps=1)
    os.rmdir(run / "final")
    os.makedirs(run / "step_1")
    (run / "step_1" / "trainer_state.json").write_text('{"step": 1}')
    (run / "latest").write_text("step_1\n")
    return run


def test_interrupted_run_with_a_checkpoint_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    run = interrupted_run(tmp_path)
    assert compare.main(["--seeds", "1", "--variants", "icrl", "--tasks", "guess", "--steps", str(STEPS),
                         "--out", str(tmp_path / "c"), "--no_plot", "--icrl_args", "--save_every 1"]) == 0
    train = calls[0]
    assert train[-2:] == ["--resume", str(run)] and train[train.index("--task") + 1] == "guess"
    assert "--save_every" in train


def test_each_task_gets_its_own_rl_steps_unless_steps_is_given(tmp_path, monkeypatch):
    """Without --steps, every run of a task has that task's RL steps (arithmetic and guess 60, boxes 150),
    and only such runs enter its table; --steps replaces them all."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "boxes", "--out", str(out), "--no_plot"]
    assert compare.main(argv) == 0
    steps = {(c[c.index("--task") + 1], c[c.index("--steps") + 1]) for c in calls if "--steps" in c}
    assert steps == {("arithmetic", "0"), ("arithmetic", "60"), ("boxes", "0"), ("boxes", "150")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["boxes"]["steps"] == 150 and summary["tasks"]["arithmetic"]["steps"] == 60
    assert summary["tasks"]["boxes"]["rows"]["icrl"]["seeds"] == [0]
    assert "### boxes (150 RL steps)" in (out / "summary.md").read_text()
    # the 150-step boxes run is not a complete 2-step run: with --steps 2 it is redone, and counts then
    calls.clear()
    assert compare.main(argv[:4] + ["--tasks", "boxes", "--out", str(out), "--no_plot", "--steps", str(STEPS)]) == 0
    assert any(c[c.index("--task") + 1] == "boxes" and c[c.index("--steps") + 1] == str(STEPS)
               for c in calls if "--steps" in c)
    assert json.loads((out / "summary.json").read_text())["tasks"]["boxes"]["steps"] == STEPS


def test_shared_flags_reach_eval():
    flags = ["--group_size", "2", "--max_new_tokens", "6", "--task_knob", "digits=3", "--enable_thinking",
             "--critic_max_new_tokens=5", "--lr", "1e-3", "--rounds", "3"]
    assert compare.shared_eval_flags(flags) == ["--max_new_tokens", "6", "--task_knob", "digits=3",
                                                "--enable_thinking", "--critic_max_new_tokens=5", "--rounds", "3"]


def test_flags_compare_sets_are_refused():
    with pytest.raises(SystemExit):
        compare.parse_args(["--icrl_args", "--steps 5"])
    assert compare.parse_args(["--icrl_args", "--group_size 2 --eval_every=1"]).icrl_flags == [
        "--group_size", "2", "--eval_every=1"]


TINY = ("--warm_start_steps 2 --warm_start_role_steps 1 --batch_prompts 2 --group_size 2 --max_new_tokens 6 "
        "--critic_max_new_tokens 6 --eval_examples 4 --eval_every 1")


def test_two_variants_one_seed_end_to_end(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["--seeds", "0", "--variants", "icrl", "grpo", "--tasks", "arithmetic", "--steps", str(STEPS),
            "--out", str(out), "--icrl_args", TINY,
            "--eval_args", "--max_examples 3 --n 2"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["tasks"]["arithmetic"]["rows"]
    assert list(rows) == ["warm_start", "icrl", "grpo"]
    for name in ("icrl", "grpo"):
        run = out / "arithmetic" / name / "seed0"
        assert (run / "final").is_dir() and (run / "eval" / "summary.json").is_file()
        evaluated = json.loads((run / "eval" / "summary.json").read_text())
        assert (evaluated["max_new_tokens"], evaluated["critic_max_new_tokens"], evaluated["n"]) == (6, 6, 2)
        seed0 = rows[name]["per_seed"]["0"]
        assert 0 <= seed0["pass1"] <= 1 and seed0["pass1_start"] is not None and seed0["wall_s"] > 0
        assert summary["tasks"]["arithmetic"]["curves"][name]["steps"] == [0, 1, 2]
    assert rows["icrl"]["per_seed"]["0"]["diff_grpo"] == pytest.approx(
        rows["icrl"]["per_seed"]["0"]["pass1"] - rows["grpo"]["per_seed"]["0"]["pass1"])
    assert "| icrl | 0 |" in printed and (out / "summary.md").read_text() in printed
    assert (out / "arithmetic.png").is_file()   # matplotlib is a test requirement
    # every variant started from the same warm start: their step-0 held-out accuracy is the same
    starts = {summary["tasks"]["arithmetic"]["curves"][n]["mean"][0] for n in ("icrl", "grpo")}
    assert len(starts) == 1


def test_a_run_with_final_but_short_of_the_steps_is_not_complete(tmp_path, monkeypatch):
    """final/ alone does not make a run complete: its metrics must reach --steps (a run made with fewer
    steps, by hand, say) or it is left out of the summary and, with no record to vouch for it, redone."""
    out = tmp_path / "compare"
    a = out / "arithmetic"
    write_run(a / "icrl" / "seed0", curve={2: 0.6}, eval_summary=ev(0.6, 0.0, 0.6))
    write_run(a / "icrl" / "seed1", steps=1, curve={1: 0.9}, eval_summary=ev(0.9, 0.0, 0.9))   # final/ kept
    assert not compare.is_complete(str(a / "icrl" / "seed1"), STEPS)
    write_run(a / "warm_start" / "seed0", steps=0)                       # a warm start needs its warm_start/
    assert not compare.is_complete(str(a / "warm_start" / "seed0"), 0)
    assert compare.summarize(str(out), STEPS)["tasks"]["arithmetic"]["rows"]["icrl"]["seeds"] == [0]
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    write_run(a / "warm_start" / "seed1", steps=0, start=0.3, eval_summary=ev(0.3, 0.0, 0.3), warm=True)
    assert compare.main(["--seeds", "1", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS),
                         "--out", str(out), "--no_plot"]) == 0
    assert [c[c.index("--out") + 1] for c in calls] == [str(a / "icrl" / "seed1"), str(a / "icrl" / "seed1" / "eval")]


def test_resumable_checkpoint_only_strictly_inside_the_run(tmp_path):
    """resumable_checkpoint's contract: a step_N with trainer_state.json and 0 < N < steps; the last step's
    checkpoint or a longer run's is no point to resume a run of `steps` from, and a step_N folder without
    trainer_state.json is a checkpoint cut off while being written."""
    run = tmp_path / "run"
    os.makedirs(run / "step_1")
    (run / "latest").write_text("step_1\n")
    assert compare.resumable_checkpoint(str(run), 2) is None
    os.rmdir(run / "step_1")
    for n in (1, 2, 3):
        os.makedirs(run / f"step_{n}")
        (run / f"step_{n}" / "trainer_state.json").write_text(json.dumps({"step": n}))
    found = {}
    for n in (1, 2, 3):
        (run / "latest").write_text(f"step_{n}\n")
        found[n] = compare.resumable_checkpoint(str(run), 2)
    assert found == {1: str(run / "step_1"), 2: None, 3: None}


def test_an_interrupted_run_of_other_flags_is_not_resumed(tmp_path, monkeypatch):
    """A checkpoint recorded under other icrl.py flags (or code, or process count) must not be continued with
    this setting: the run is removed and started over, not resumed into a mix of two settings."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    run = interrupted_run(tmp_path)
    (run / "compare_run.json").write_text(json.dumps({"flags": ["--other"], "nproc": 2, "code": compare.code_version(),
                                                      "attempts": [1.0]}))
    assert compare.main(["--seeds", "1", "--variants", "icrl", "--tasks", "guess", "--steps", str(STEPS),
                         "--out", str(tmp_path / "c"), "--no_plot", "--icrl_args", "--save_every 1"]) == 0
    train = calls[0]
    assert "--resume" not in train and "--overwrite" in train and train[train.index("--out") + 1] == str(run)
    assert len(json.loads((run / "compare_run.json").read_text())["attempts"]) == 1   # a new run's attempts


def test_code_version_hashes_each_of_the_four_files(tmp_path, monkeypatch):
    """A run made by other code is redone: a change to any of icrl.py, model.py, data.py or eval.py must change
    code_version (and nothing else in the folder does)."""
    for name in ("icrl.py", "model.py", "data.py", "eval.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    monkeypatch.setattr(compare, "ROOT", str(tmp_path))

    def version():
        compare.code_version.cache_clear()
        return compare.code_version()

    try:
        seen = {version()}
        (tmp_path / "README.md").write_text("not code")
        assert version() in seen
        for name in ("icrl.py", "model.py", "data.py", "eval.py"):
            (tmp_path / name).write_text(f"# {name}, changed\n")
            seen.add(version())
        assert len(seen) == 5
    finally:
        compare.code_version.cache_clear()


def test_another_spelling_of_out_redoes_nothing(tmp_path, monkeypatch):
    """The --out and --model paths lie inside OUT: ./X, an absolute path or a renamed folder is the same
    comparison, whose complete runs and evaluations are kept."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS), "--no_plot"]
    assert compare.main(argv + ["--out", str(tmp_path / "c")]) == 0 and len(calls) == 4
    calls.clear()
    monkeypatch.chdir(tmp_path)
    assert compare.main(argv + ["--out", "./c"]) == 0 and calls == []
    os.rename(tmp_path / "c", tmp_path / "renamed")
    assert compare.main(argv + ["--out", "renamed"]) == 0 and calls == []
    assert table_rows(tmp_path / "renamed") == ["warm_start", "icrl"]


def test_commands_run_in_the_folder_compare_was_started_in(tmp_path, monkeypatch):
    """A relative --out names the same folder for compare.py's checks and for icrl.py and eval.py."""
    os.makedirs(tmp_path / "root")
    os.makedirs(tmp_path / "here")
    monkeypatch.setattr(compare, "ROOT", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path / "here")
    cmd = [sys.executable, "-c", "open('written', 'w').close()"]
    assert compare.run_command(cmd, str(tmp_path / "log"), dict(os.environ)) == 0
    assert (tmp_path / "here" / "written").is_file() and not (tmp_path / "root" / "written").exists()


def test_records_from_before_warm_starts_were_recorded_are_kept(tmp_path, monkeypatch):
    """A record without warm_start / started (older compare.py) reads as None, in Runner.train as in
    is_stale: its complete runs are kept, not redone."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS), "--out", str(out),
            "--no_plot"]
    assert compare.main(argv) == 0
    for name in ("warm_start", "icrl"):
        path = out / "arithmetic" / name / "seed0" / "compare_run.json"
        record = json.loads(path.read_text())
        del record["warm_start"], record["started"]
        path.write_text(json.dumps(record))
    calls.clear()
    assert compare.main(argv) == 0 and calls == []
    assert table_rows(out) == ["warm_start", "icrl"]


def test_a_run_made_by_hand_stays_trusted_once_evaluated(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "compare" / "arithmetic"
    write_run(out / "warm_start" / "seed0", steps=0, start=0.3, warm=True)   # no evaluation, no record
    write_run(out / "icrl" / "seed0", curve={2: 0.6}, start=0.3)
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS),
            "--out", str(tmp_path / "compare"), "--no_plot"]
    assert compare.main(argv) == 0
    assert [c[c.index("--out") + 1] for c in calls] == [str(out / "warm_start" / "seed0" / "eval"),
                                                       str(out / "icrl" / "seed0" / "eval")]
    assert table_rows(tmp_path / "compare") == ["warm_start", "icrl"]
    calls.clear()
    assert compare.main(argv) == 0 and calls == []
    assert table_rows(tmp_path / "compare") == ["warm_start", "icrl"]


def test_an_evaluation_missing_from_the_record_is_redone(tmp_path, monkeypatch):
    """Cut off between eval.py's exit and the record's update (or evaluated by hand): the evaluation is
    redone, not skipped while the table leaves the run out for good."""
    calls = []
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    out = tmp_path / "c"
    icrl = out / "arithmetic" / "icrl" / "seed0"
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--steps", str(STEPS), "--out", str(out),
            "--no_plot"]
    assert compare.main(argv) == 0
    record = json.loads((icrl / "compare_run.json").read_text())
    for key in ("eval_flags", "eval_code", "eval_wall_s"):
        del record[key]
    (icrl / "compare_run.json").write_text(json.dumps(record))
    calls.clear()
    assert compare.main(argv) == 0 and [c[c.index("--out") + 1] for c in calls] == [str(icrl / "eval")]
    assert table_rows(out) == ["warm_start", "icrl"]


def test_abbreviations_of_flags_compare_sets_are_refused(capsys):
    """icrl.py's parser takes any unambiguous prefix of a flag: --alg is --algo."""
    for given in ("--alg grpo", "--critic_g always", "--no_critic", "--ad pooled", "--calib=none", "--ste 5",
                  "--mod x"):
        with pytest.raises(SystemExit):
            compare.parse_args([f"--icrl_args={given}"])
        assert given.split()[0] in capsys.readouterr().err
    # a longer flag that only begins with a name compare.py sets is icrl.py's own
    assert compare.parse_args(["--icrl_args", "--calib_clip 2 --task_knob digits=3"]).icrl_flags == [
        "--calib_clip", "2", "--task_knob", "digits=3"]


def test_eval_flags_compare_sets_are_refused(capsys):
    """--eval_args may not pick another checkpoint, task, seed or output: eval.py's parser takes the last of a
    repeated flag, so a --model there would evaluate another checkpoint than the run's, silently."""
    for given in ("--model other/final", "--task arithmetic", "--seed 3", "--task_seed=1", "--out x", "--mod x"):
        with pytest.raises(SystemExit):
            compare.parse_args([f"--eval_args={given}"])
        assert given.split()[0].split("=")[0] in capsys.readouterr().err
    assert compare.parse_args(["--eval_args", "--n 8 --task_knob digits=3 --critic_model c"]).eval_flags == [
        "--n", "8", "--task_knob", "digits=3", "--critic_model", "c"]


def test_abbreviated_shared_flags_reach_eval_in_full():
    assert compare.shared_eval_flags(["--temp", "0.5", "--lr", "1e-3", "--max_new=6", "--enable"]) == [
        "--temperature", "0.5", "--max_new_tokens=6", "--enable_thinking"]


def test_summary_only_says_why_a_run_of_other_steps_is_left_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_command", fake_runner([]))
    out = tmp_path / "c"
    argv = ["--seeds", "0", "--variants", "icrl", "--tasks", "arithmetic", "--out", str(out), "--no_plot"]
    assert compare.main(argv + ["--steps", str(STEPS)]) == 0
    capsys.readouterr()
    assert compare.main(argv + ["--summary_only"]) == 0   # the task's own 60 RL steps
    assert (f"left out of the table: {out / 'arithmetic' / 'icrl' / 'seed0'}: has {STEPS} of the 60 RL steps"
            in capsys.readouterr().out)


def test_seeds_trained_or_evaluated_otherwise_are_left_out(tmp_path, monkeypatch, capsys):
    """One table, one setting: a seed added later with other icrl.py flags, other eval.py flags or another
    process count is left out, with a line naming how it differs from the first seed's."""
    calls = []
    out = tmp_path / "c"
    argv = ["--tasks", "arithmetic", "--variants", "icrl", "--steps", str(STEPS), "--out", str(out), "--no_plot"]
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    assert compare.main(argv + ["--seeds", "0", "1"]) == 0
    assert compare.main(argv + ["--seeds", "2", "--icrl_args", "--lr 1e-2"]) == 0
    assert compare.main(argv + ["--seeds", "3", "--eval_args", "--temperature 0.2"]) == 0
    monkeypatch.setattr(compare, "run_command", fake_runner(calls, nproc="1"))
    capsys.readouterr()
    assert compare.main(argv + ["--seeds", "4", "--nproc", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = json.loads((out / "summary.json").read_text())["tasks"]["arithmetic"]["rows"]
    assert rows["warm_start"]["seeds"] == [0, 1] and rows["icrl"]["seeds"] == [0, 1]
    for seed, differs in ((2, "--lr 1e-2"), (3, "--temperature 0.2"), (4, "nproc 1")):
        for name in ("warm_start", "icrl"):
            head = f"left out of the table: {out / 'arithmetic' / name / f'seed{seed}'}: "
            line = [x for x in printed if x.startswith(head)]
            assert len(line) == 1 and "seed 0" in line[0] and differs in line[0]


def test_seeds_rerun_with_new_flags_make_the_table(tmp_path, monkeypatch, capsys):
    """The table's setting is the one most seeds share (a tie: the newest warm start's): seeds 1 and 2 redone
    with a new --lr make the table, and seed 0, left behind with the old one, is left out."""
    calls = []
    out = tmp_path / "c"
    argv = ["--tasks", "arithmetic", "--variants", "icrl", "--steps", str(STEPS), "--out", str(out), "--no_plot"]
    monkeypatch.setattr(compare, "run_command", fake_runner(calls))
    assert compare.main(argv + ["--seeds", "0", "1", "2"]) == 0
    capsys.readouterr()
    assert compare.main(argv + ["--seeds", "1", "2", "--icrl_args", "--lr 1e-2"]) == 0
    rows = json.loads((out / "summary.json").read_text())["tasks"]["arithmetic"]["rows"]
    assert rows["warm_start"]["seeds"] == [1, 2] and rows["icrl"]["seeds"] == [1, 2]
    assert any(line.startswith(f"left out of the table: {out / 'arithmetic' / 'warm_start' / 'seed0'}: ")
               and "seed 1" in line for line in capsys.readouterr().out.splitlines())
    assert compare.main(argv + ["--seeds", "0", "--icrl_args", "--lr 1e-2"]) == 0   # all three again, one setting
    rows = json.loads((out / "summary.json").read_text())["tasks"]["arithmetic"]["rows"]
    assert rows["icrl"]["seeds"] == [0, 1, 2]
    # one seed of another setting beside three: the three's, even when it is this invocation's
    assert compare.main(argv + ["--seeds", "3", "--icrl_args", "--lr 5e-3"]) == 0
    assert json.loads((out / "summary.json").read_text())["tasks"]["arithmetic"]["rows"]["icrl"]["seeds"] == [0, 1, 2]
    # a tie, one seed each: a warm start whose evaluation never finished is never the table's, though newer; among
    # whole ones, this invocation's setting
    record = {"flags": ["--seed", "0"], "nproc": 2}
    whole = dict(record, started=2.0, eval_flags=["--model", "m", "--n", "4", "--out", "o"])
    assert set(compare.other_settings({0: whole, 1: dict(record, nproc=1, started=3.0)})) == {1}
    other = dict(whole, started=1.0, eval_flags=["--model", "m", "--n", "2", "--out", "o"])
    assert set(compare.other_settings({0: whole, 1: other})) == {1}               # the newer
    assert set(compare.other_settings({0: whole, 1: other}, invoked=(1,))) == {0}  # this invocation's


def test_eval_settings_warn_of_any_difference_but_the_model(tmp_path):
    a = tmp_path / "c" / "arithmetic"
    setting = {"examples": 200, "n": 4, "rounds": 2, "critic_gate": "failure", "task_seed": 0, "seed": 0,
               "temperature": 1.0, "max_new_tokens": 16}
    for seed in (0, 1):   # made by hand: no records to compare, only what eval.py wrote
        write_run(a / "icrl" / f"seed{seed}", curve={2: 0.5},
                  eval_summary=dict(ev(0.5, 0.0, 0.5), **setting, model=f"m{seed}"))
    assert "WARNING" not in compare.markdown(compare.summarize(str(tmp_path / "c"), STEPS))
    write_run(a / "icrl" / "seed1", curve={2: 0.5},
              eval_summary=dict(ev(0.5, 0.0, 0.5), **dict(setting, temperature=0.2), model="m1"))
    text = compare.markdown(compare.summarize(str(tmp_path / "c"), STEPS))
    assert "WARNING" in text and "temperature" in text and "1.0" in text and "0.2" in text


def test_figures_over_fewer_seeds_than_their_row_name_them(made_up):
    """GRPO's seed 1 failed: ICRL's Δ is over seeds 0 and 2 (.05, .18), and says so, as its critique_value
    (null on seed 1) does."""
    shutil.rmtree(made_up / "arithmetic" / "grpo" / "seed1")
    _, text, _ = compare.write_summary(str(made_up), STEPS, plot=False)
    assert ("| icrl | 0,1,2 | 35.0 ± 5.0 | 60.0 ± 10.0 | +25.0 ± 8.7 | +11.5 ± 9.2 (seeds 0,2) | "
            "-20.0 ± 14.1 (seeds 0,2) | 65.0 ± 10.0 |") in text
    assert "| grpo | 0,2 | 37.5 ± 3.5 | 53.5 ± 2.1 |" in text


def test_make_compare_passes_one_token_args_whole(tmp_path):
    """`make compare ICRL_ARGS=--enable_thinking EVAL_ARGS=--n=2`: each reaches compare.py as one value
    (`make -n` in a copy prints the command and runs nothing)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "Makefile"), tmp_path / "Makefile")
    for name in ("requirements.txt", "requirements-test.txt"):
        (tmp_path / name).write_text("")
    printed = subprocess.run(["make", "-n", "compare", "ICRL_ARGS=--enable_thinking", "EVAL_ARGS=--n=2"],
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    line = next(x for x in printed.replace("\\\n", " ").splitlines() if "tests/compare.py" in x)
    words = shlex.split(line)
    args = compare.parse_args(words[words.index("tests/compare.py") + 1:])
    assert args.icrl_flags == ["--enable_thinking"] and args.eval_flags == ["--n=2"]
    assert not (tmp_path / ".venv").exists()
