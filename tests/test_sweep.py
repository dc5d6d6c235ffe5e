"""gptkit sweep: Optuna over recipe fields, each trial an ordinary run in SWEEP/trial-NNN; a killed sweep resumes
with the interrupted trial run again; bad spaces are refused in one line before any trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import SHAKESPEARE, assert_user_error, run_cli, tiny_recipe


@pytest.fixture
def recipe(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    return tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "unused",
                       train={"max_steps": 30, "eval_every": 10, "save_every": 30, "warmup_steps": 2, "min_lr": 1e-5})


def space(tmp_path, **content):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def trials(out) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def test_grid_sweep_finds_the_best_learning_rate(tmp_path, recipe):
    """lr 1e-4 / 1e-3 / 1e-2 x two seeds: 30 steps of a tiny model learn most with the largest rate."""
    s = space(tmp_path, sampler="grid", trials=6, **{"train.lr": {"choice": [1e-4, 1e-3, 1e-2]},
                                                    "train.seed": {"choice": [1, 2]}})
    code, stdout, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"))
    assert code == 0, err
    rows = trials(tmp_path / "sw")
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert sorted((float(r["train.lr"]), int(r["train.seed"])) for r in rows) == \
        sorted((lr, seed) for lr in (1e-4, 1e-3, 1e-2) for seed in (1, 2))
    best = yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())
    assert best["train"]["lr"] == 0.01 and "best: trial" in stdout
    assert (tmp_path / "sw" / "history.png").is_file() and (tmp_path / "sw" / "importance.png").is_file()
    for r in rows:  # each trial is a complete gptkit run folder with its own resolved recipe
        if r["state"] == "COMPLETE":
            assert yaml.safe_load(open(f"{r['run_dir']}/recipe.yaml"))["train"]["lr"] == float(r["train.lr"])
    code, _, err = run_cli("pretrain", str(tmp_path / "sw" / "best.yaml"))  # runnable as is
    assert code == 0, err


def stopped_mid_trial(tmp_path, recipe, n_trials: int, seed: int, trial: str, sig: int):
    """A random sweep of ``n_trials`` over lr, its process group sent ``sig`` once ``trial`` logs, then resumed: its
    trials.csv rows and the trials marked interrupted."""
    import optuna

    s = space(tmp_path, sampler="random", pruner="none", trials=n_trials, seed=seed,
              **{"train.lr": {"log_uniform": [1e-3, 1e-2]}})
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "gptkit", "sweep", str(recipe), "--space", str(s), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / trial / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), proc.stderr.read().decode()[-2000:]
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out))
    assert_user_error(code, err, "--resume")  # a sweep is there: never started over silently
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert code == 0, err
    study = optuna.load_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}")
    return trials(out), [t for t in study.trials if t.user_attrs.get("interrupted")]


def test_killed_sweep_resumes_to_exactly_the_trials_asked(tmp_path, recipe):
    """SIGKILL to the sweep and its running trial (mid-trial 1): --resume runs that trial again with its values, the
    sampler draws new ones (its seed alone gave the first trials' values again), and 6 trials finish."""
    rows, retried = stopped_mid_trial(tmp_path, recipe, 6, 3, "trial-001", signal.SIGKILL)
    assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows), rows
    assert len(retried) == 1 and retried[0].params["train.lr"] in [float(r["train.lr"]) for r in rows]
    assert len({r["train.lr"] for r in rows}) == 6, rows


def test_a_sweep_stopped_with_ctrl_c_runs_the_stopped_trial_again(tmp_path, recipe):
    """Ctrl-C (SIGINT to the terminal's process group): Optuna fails the running trial; --resume runs it again with
    the same values, as it does a killed sweep's (it counted as done, and was never retried)."""
    rows, stopped = stopped_mid_trial(tmp_path, recipe, 2, 5, "trial-000", signal.SIGINT)
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows), rows
    assert len(stopped) == 1 and stopped[0].params["train.lr"] in [float(r["train.lr"]) for r in rows]


@pytest.mark.parametrize("content, needles", [
    ({"train.learning_rat": {"log_uniform": [1e-4, 1e-3]}}, ["train.learning_rat", "unknown key"]),
    ({"train.lr": {"log_uniform": [0, 1e-3]}}, ["train.lr", "positive low bound"]),
    ({"train.lr": {"normal": [0, 1]}}, ["train.lr", "expected one of"]),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, ["low < high"]),
    ({"model.n_layer": {"choice": [2, 0]}}, ["model.n_layer"]),
    ({"sampler": "bayes", "train.lr": {"choice": [1e-3]}}, ["sampler", "tpe, random, grid"]),
    ({"sampler": "grid", "train.lr": {"log_uniform": [1e-4, 1e-3]}}, ["grid needs choice or int"]),
    ({"trials": 6}, ["names no recipe field"]),
    ({"train.batch_size": {"int": [8, 32], "step": 0}}, ["space.yaml", "train.batch_size", "step", "positive integer"]),
    ({"train.batch_size": {"int": [8, 32], "step": "x"}}, ["train.batch_size", "step", "got 'x'"]),
    ({"train.batch_size": {"int": [8, 32], "step": 2.5}}, ["train.batch_size", "step", "positive integer"]),
    ({"train.lr": {"uniform": [1e-4, 1e-3], "step": -1e-4}}, ["train.lr", "step", "positive number"]),
    ({"train.lr": {"log_uniform": [1e-4, 1e-3], "step": 1e-4}}, ["train.lr", "step", "log_uniform takes no step"]),
    ({"train.lr": {"choice": [1e-4, 1e-3], "step": 1}}, ["train.lr", "step", "choice takes no step"]),
    ({"seed": "abc", "train.lr": {"choice": [1e-3]}}, ["space.yaml", "seed", "integer", "'abc'"]),
    ({"seed": -1, "train.lr": {"choice": [1e-3]}}, ["seed", "integer"]),
    ({"metric": 5, "train.lr": {"choice": [1e-3]}}, ["metric", "val_loss"]),
    ({"trials": True, "train.lr": {"choice": [1e-3]}}, ["trials", "positive integer"]),
    ({"train.lr": {"log_uniform": [1e-3, float("inf")]}}, ["space.yaml", "train.lr", "finite bounds"]),
    ({"train.lr": {"uniform": [float("-inf"), 1.0]}}, ["train.lr", "finite bounds"]),
    ({"params": 5}, ["space.yaml", "params", "mapping", "got 5"]),
    ({"train.warmup_steps": {"uniform": [0, 3]}}, ["space.yaml", "train.warmup_steps", "integer", "{int: [0, 3]}"]),
    ({"train.eval_batches": {"log_uniform": [1, 4]}}, ["train.eval_batches", "integer", "use {int: [1, 4]}"]),
])
def test_bad_spaces_are_refused_before_any_trial(tmp_path, recipe, content, needles):
    code, _, err = run_cli("sweep", str(recipe), "--space", str(space(tmp_path, **content)), "--out", str(tmp_path / "sw"))
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "sw").exists()  # nothing written: no space.yaml, no study.db


def test_a_bad_space_leaves_an_existing_sweep_and_a_file_alone(tmp_path, recipe):
    old = tmp_path / "sw"
    old.mkdir()
    (old / "study.db").write_bytes(b"an earlier sweep")
    s = space(tmp_path, **{"model.n_layer": {"choice": [2, 0]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(old), "--overwrite")
    assert_user_error(code, err, "model.n_layer")
    assert (old / "study.db").read_bytes() == b"an earlier sweep"  # --overwrite removes nothing for a refused space
    (tmp_path / "notes.txt").write_text("mine")
    s = space(tmp_path, **{"train.lr": {"choice": [1e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "notes.txt"))
    assert_user_error(code, err, "--out", "notes.txt", "not a folder")
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "notes.txt" / "x"))
    assert_user_error(code, err, "--out", "is under", "notes.txt", "which is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_holding_no_sweep_is_never_removed_or_written_into(tmp_path, recipe):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    s = out / "lr.yaml"
    s.write_text(yaml.safe_dump({"train.lr": {"choice": [1e-3]}, "trials": 1}))
    for flags in (["--overwrite"], [], ["--resume"]):
        code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), *flags)
        assert_user_error(code, err, str(out), "holds no sweep")
    assert sorted(p.name for p in out.iterdir()) == ["lr.yaml", "thesis.tex"]
    (out / "study.db").write_bytes(b"an earlier sweep")  # now a sweep folder: --overwrite would remove lr.yaml
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--overwrite")
    assert_user_error(code, err, "--space", "lr.yaml", "--overwrite")
    assert (out / "thesis.tex").read_text() == "mine" and (out / "study.db").read_bytes() == b"an earlier sweep"
    # a space file named space.yaml (the name a sweep writes back) does not make a folder a sweep's
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    (other / "space.yaml").write_text(s.read_text())
    code, _, err = run_cli("sweep", str(recipe), "--space", str(other / "space.yaml"), "--out", str(other),
                           "--overwrite")
    assert_user_error(code, err, str(other), "holds no sweep")
    assert sorted(p.name for p in other.iterdir()) == ["space.yaml", "thesis.tex"]
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "absent"), "--resume")
    assert_user_error(code, err, "--resume", "absent holds no sweep yet")  # a typo'd --out: no new sweep there
    assert not (tmp_path / "absent").exists()


def test_overwrite_reads_the_space_file_the_sweep_folder_holds(tmp_path, recipe):
    """--space SWEEP/space.yaml --overwrite: the space is read before the folder is removed, then written back."""
    out = tmp_path / "sw"
    out.mkdir()
    (out / "study.db").write_bytes(b"an earlier sweep")
    text = yaml.safe_dump({"train.batch_size": {"choice": [100000]}, "trials": 1, "pruner": "none"})
    (out / "space.yaml").write_text(text)  # a trial that fails at once: no training
    code, _, err = run_cli("sweep", str(recipe), "--space", str(out / "space.yaml"), "--out", str(out), "--overwrite")
    assert code == 2 and "no trial finished" in err, err  # (the one trial's user error)
    assert (out / "space.yaml").read_text() == text and [r["state"] for r in trials(out)] == ["FAIL"]


def test_resuming_with_a_changed_distribution_is_refused_before_anything_changes(tmp_path, recipe):
    """Another list of choices than the study's: one line, space.yaml and the study as they were; new bounds for a
    range are fine (trials: 1 is already done, so no trial runs)."""
    import optuna

    out = tmp_path / "sw"
    out.mkdir()
    stored = yaml.safe_dump({"train.lr": {"choice": [1e-3, 1e-2]}, "train.max_steps": {"int": [10, 30]}})
    (out / "space.yaml").write_text(stored)
    study = optuna.create_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}")
    study.add_trial(optuna.trial.create_trial(
        params={"train.lr": 1e-3, "train.max_steps": 20}, value=2.0,
        distributions={"train.lr": optuna.distributions.CategoricalDistribution([1e-3, 1e-2]),
                       "train.max_steps": optuna.distributions.IntDistribution(10, 30)}))
    s = space(tmp_path, trials=2, **{"train.lr": {"choice": [1e-4, 1e-3]}, "train.max_steps": {"int": [10, 30]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert_user_error(code, err, "space.yaml", "train.lr", "has choice [0.001, 0.01], not choice [0.0001, 0.001]")
    assert (out / "space.yaml").read_text() == stored
    assert len(optuna.load_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}").trials) == 1
    s = space(tmp_path, trials=2, **{"train.lr": {"choice": [1e-3, 1e-2]}, "train.max_steps": {"choice": [10, 30]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert_user_error(code, err, "train.max_steps", "has int [10, 30], not choice [10, 30]")
    s = space(tmp_path, trials=1, **{"train.lr": {"choice": [1e-3, 1e-2]}, "train.max_steps": {"int": [5, 40]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert code == 0, err
    assert yaml.safe_load((out / "space.yaml").read_text())["train.max_steps"] == {"int": [5, 40]}


def test_a_uniform_step_is_honoured(tmp_path):
    import optuna

    from gptkit.sweep import _suggest, read_space

    s = read_space(space(tmp_path, **{"train.lr": {"uniform": [0.001, 0.01], "step": 0.001},
                                      "train.batch_size": {"int": [8, 32], "step": 8}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        values = {k: _suggest(trial, k, d) for k, d in s.params.items()}
        assert round(values["train.lr"] * 1000, 6) == round(values["train.lr"] * 1000)  # a multiple of the step
        assert values["train.batch_size"] in (8, 16, 24, 32)


def test_a_null_choice_reaches_the_recipe_as_none(tmp_path, recipe):
    """{choice: [null, ...]}: a number field and a text field both get None, not the text 'None'."""
    from gptkit.recipe import load_recipe
    from gptkit.sweep import _override

    r = load_recipe(recipe, [_override("model.dropout", None), _override("finetune.prompt", None)])
    assert r.model.dropout is None and r.finetune.prompt is None


def test_the_objective_direction_follows_the_recipe(tmp_path, recipe):
    """A finetune recipe's metric_higher_is_better gives the direction of its metric unless the space says one."""
    from gptkit.recipe import load_recipe
    from gptkit.sweep import Space, _objective_name

    base = load_recipe(recipe)
    ter = base.model_copy(update={"task": "translate", "finetune": base.finetune.model_copy(
        update={"metric": "val_ter", "metric_higher_is_better": False})})
    assert _objective_name(ter, Space(params={})) == ("val_ter", "minimize")
    assert _objective_name(ter, Space(params={}, direction="maximize")) == ("val_ter", "maximize")
    assert _objective_name(ter, Space(params={}, metric="val_bleu")) == ("val_bleu", "maximize")
    task_default = ter.model_copy(update={"finetune": ter.finetune.model_copy(update={"metric": None})})
    assert _objective_name(task_default, Space(params={})) == ("val_bleu", "minimize")  # as the run selects it
    assert _objective_name(base, Space(params={})) == ("val_loss", "minimize")


def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, recipe):
    s = space(tmp_path, sampler="grid", trials=2, pruner="none", **{"train.batch_size": {"choice": [8, 100000]}})
    code, stdout, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"))
    assert code == 0, err
    rows = {r["train.batch_size"]: r for r in trials(tmp_path / "sw")}
    assert rows["8"]["state"] == "COMPLETE" and rows["100000"]["state"] == "FAIL"
    assert "examples per step" in rows["100000"]["error"]


def test_two_workers_share_one_study(tmp_path, recipe):
    """Two sweep processes on one journal-file study (what several machines do with a shared database): the trials
    are split between them, none is run twice, and together they stop at the number asked (+1 at most: a worker
    may start one while the other finishes the last)."""
    s = space(tmp_path, sampler="random", pruner="none", trials=4, **{"train.lr": {"log_uniform": [1e-3, 1e-2]}})
    journal = tmp_path / "study.journal"
    cmd = [sys.executable, "-m", "gptkit", "sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"),
           "--storage", f"journal:{journal}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    import optuna

    study = optuna.load_study(study_name="gptkit-sweep",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 4 <= len(done) <= 5 and len({t.user_attrs["run_dir"] for t in done}) == len(done)
    assert len({t.user_attrs["worker"] for t in done}) == 2


def test_the_pruner_stops_a_trial_that_cannot_win(tmp_path):
    """Two good trials (lr 1e-2, 60 steps) then a hopeless one (lr 1e-6, 3000 steps), queued in the study the sweep
    continues: the median pruner stops the third at its first evaluations and its process is ended, unfinished."""
    import optuna

    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "unused",
                         train={"eval_every": 10, "save_every": 3000, "warmup_steps": 2, "min_lr": 1e-7})
    s = space(tmp_path, sampler="random", pruner="median", trials=3, **{"train.lr": {"choice": [1e-2, 1e-6]},
                                                                        "train.max_steps": {"choice": [60, 3000]}})
    out = tmp_path / "sw"
    out.mkdir()
    study = optuna.create_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}")
    for lr, steps in ((1e-2, 60), (1e-2, 60), (1e-6, 3000)):  # an order a random sampler might also draw
        study.enqueue_trial({"train.lr": lr, "train.max_steps": steps})
    code, stdout, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert code == 0, err
    rows = trials(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"], rows
    logged = [json.loads(x) for x in (out / "trial-002" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) < 3000 and not (out / "trial-002" / "model.safetensors").exists()
    pruned = optuna.load_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}").trials[2]
    assert list(pruned.intermediate_values) == [10]  # stopped at its first evaluation


def test_a_user_metric_is_a_sweep_objective(tmp_path):
    """finetune.extra_metrics' figure as the objective: each trial's value is its best logged val_length_ratio and the
    winner is the trial with the lowest."""
    from test_user_metrics import LENGTH_RATIO
    from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows

    metric = tmp_path / "length_ratio.py"
    metric.write_text(LENGTH_RATIO)
    base = pretrained_base(tmp_path)
    recipe = finetune_recipe(tmp_path, "unused", "translate", base, splits(tmp_path, translate_rows, 200),
                             finetune={"extra_metrics": [str(metric)], "eval_examples": 10, "max_new_tokens": 8},
                             train={"max_steps": 20, "eval_every": 10, "save_every": 20, "min_lr": 1e-5})
    s = space(tmp_path, sampler="grid", pruner="none", trials=2, metric="val_length_ratio", direction="minimize",
              **{"train.lr": {"choice": [1e-4, 3e-3]}})
    code, stdout, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"))
    assert code == 0, err
    rows = trials(tmp_path / "sw")
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows), rows
    for r in rows:
        logged = [json.loads(x) for x in open(f"{r['run_dir']}/metrics.jsonl")]
        assert float(r["val_length_ratio"]) == pytest.approx(min(x["val_length_ratio"] for x in logged
                                                                  if "val_length_ratio" in x))
    best = min(rows, key=lambda r: float(r["val_length_ratio"]))
    assert yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())["train"]["lr"] == float(best["train.lr"])


def test_an_objective_no_trial_logs_stops_the_sweep_in_one_line(tmp_path, recipe):
    s = space(tmp_path, trials=3, pruner="none", metric="val_blue", **{"train.lr": {"choice": [1e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"))
    assert_user_error(code, err, "val_blue", "val_loss")
    assert len(trials(tmp_path / "sw")) <= 1 if (tmp_path / "sw" / "trials.csv").exists() else True


def test_a_float_override_reads_back_as_the_same_number():
    """YAML reads 1e-05 as text: the override written for a trial must read back as the float suggested."""
    from gptkit.recipe import _parse_override
    from gptkit.sweep import _override

    for value in (1e-5, 3e-4, 2.5e-07, 1e20, 0.1, 7, True, None, "fp32"):
        assert _parse_override(_override("train.lr", value)) == (["train", "lr"], value), value
        assert type(_parse_override(_override("train.lr", value))[1]) is type(value)


def test_resuming_with_another_objective_or_grid_is_refused(tmp_path, recipe):
    """Optuna keeps a stored study's direction whatever is asked, and a grid sampler given another grid starts it
    over while the old trials still count: both refused in one line, the study as it was."""
    import optuna

    out = tmp_path / "sw"
    s = space(tmp_path, trials=1, sampler="grid", **{"train.lr": {"choice": [1e-3, 3e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out))
    assert code == 0, err
    s = space(tmp_path, trials=2, sampler="grid", direction="maximize", **{"train.lr": {"choice": [1e-3, 3e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert_user_error(code, err, "space.yaml", "minimizes val_loss, not maximizes val_loss")
    s = space(tmp_path, trials=2, sampler="grid", metric="val_perplexity", **{"train.lr": {"choice": [1e-3, 3e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert_user_error(code, err, "minimizes val_loss, not minimizes val_perplexity")
    s = space(tmp_path, trials=2, sampler="grid", **{"train.lr": {"choice": [1e-3, 3e-3, 1e-2]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(out), "--resume")
    assert_user_error(code, err, "the grid sweep being continued has another grid")
    assert len(optuna.load_study(study_name="gptkit-sweep", storage=f"sqlite:///{out / 'study.db'}").trials) == 1


def test_a_user_error_every_trial_repeats_stops_the_sweep(tmp_path, recipe):
    """Trials failing with the same user error (a data file that is not there) stop the sweep at the second, in one
    line and exit 2, rather than running (and failing) every trial."""
    s = space(tmp_path, trials=4, pruner="none", **{"train.lr": {"choice": [1e-3, 2e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"),
                           f"data.train_files=[{tmp_path / 'gone.txt'}]")
    assert_user_error(code, err, "trials 0 and 1 failed alike", "gone.txt", "not found")
    assert not (tmp_path / "sw" / "trial-002.log").exists()


def test_a_sweep_no_trial_finished_fails(tmp_path, recipe):
    s = space(tmp_path, trials=1, pruner="none", **{"train.lr": {"choice": [1e-3]}})
    code, out, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"),
                             f"data.train_files=[{tmp_path / 'gone.txt'}]")
    assert_user_error(code, err, "no trial finished", "FAIL", "trials.csv")
    assert trials(tmp_path / "sw")[0]["state"] == "FAIL"


@pytest.mark.parametrize("storage, needles", [
    ("bogus://x", ["--storage", "bogus://x", "Can't load plugin"]),
    ("sqlite:///{tmp}/no/such/dir/x.db", ["--storage", "unable to open database file"]),
    ("journal:{tmp}/no/such/dir/j.log", ["--storage", "No such file or directory"]),
    ("postgresql://u@localhost:1/db", ["--storage", "postgresql://u@localhost:1/db"]),  # no driver, or no server
])
def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, recipe, storage, needles):
    s = space(tmp_path, trials=1, **{"train.lr": {"choice": [1e-3]}})
    code, _, err = run_cli("sweep", str(recipe), "--space", str(s), "--out", str(tmp_path / "sw"),
                           "--storage", storage.format(tmp=tmp_path))
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "sw").exists()
