"""A resume is refused when the tokenizer, data or batch schedule changed, unless allowed by name."""

import pytest

from helpers.launch import config_errors, run_train


def _job(write_config, **sections):
    from gptforge.training.job import resolve_job

    return resolve_job(write_config(**sections), [], world_size=1)


def test_every_change_is_named(write_config):
    from gptforge.training.resume_check import resume_changes, resume_identity

    saved = {"resume_identity": resume_identity(_job(write_config))}
    job = _job(write_config, data={"seed": 8, "split": "80,20,0"}, train={"global_batch_size": 8, "seq_len": 16})
    changes = resume_changes(saved, job)
    assert set(changes) == {"data.seed", "data.split", "train.global_batch_size", "train.seq_len"}
    assert changes["data.seed"] == (7, 8) and changes["train.seq_len"] == (32, 16)
    other_tokenizer = saved | {"resume_identity": saved["resume_identity"] | {"tokenizer": "0" * 64}}
    assert set(resume_changes(other_tokenizer, _job(write_config))) == {"tokenizer"}
    # only the tokenizer matters for an imported model (a new data sequence starts at step 0)
    assert set(resume_changes(other_tokenizer | {"weights_only": True}, job)) == {"tokenizer"}
    assert resume_changes(saved, _job(write_config, train={"max_steps": 99})) == {}  # extending is no change


def test_unknown_allow_changes_key_is_a_config_error(write_config):
    errors = config_errors(write_config(checkpoint={"allow_changes": ["data.seed", "model.n_layer"]}))
    assert len(errors) == 1 and errors[0].startswith("checkpoint.allow_changes[1]: 'model.n_layer'")


def test_changed_resume_is_refused_then_allowed(tmp_path, write_config):
    run_dir = tmp_path / "run"
    first = write_config("a.yaml", run_dir=run_dir, train={"max_steps": 4, "eval_interval": 0})
    assert run_train(first).returncode == 0
    changed = write_config("b.yaml", run_dir=run_dir, train={"max_steps": 6, "eval_interval": 0,
                                                             "global_batch_size": 8}, data={"seed": 9})
    proc = run_train(changed, "--resume", "auto")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint"), proc.stderr
    assert "data.seed: checkpoint 7, config 9" in err[0] and "train.global_batch_size: checkpoint 4, config 8" in err[0]
    assert "checkpoint.allow_changes=[data.seed,train.global_batch_size]" in err[0]
    proc = run_train(changed, "--resume", "auto", "checkpoint.allow_changes=[data.seed,train.global_batch_size]")
    assert proc.returncode == 0, proc.stderr
    assert "accepts: data.seed: 7 -> 9" in proc.stdout and "resumed from" in proc.stdout
