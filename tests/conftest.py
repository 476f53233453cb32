"""Test tiers, and the shared fixtures: a small real-text corpus (docstrings of the Python standard library,
which every machine with Python has; PSF License), a tokenizer trained on it, its indexed dataset, and a
config writer.

Tiers (registered in pytest.ini): every test has exactly one of ``unit``, ``dist``, ``slurm``, ``slow``.
A module names the tier of all its tests in its ``pytestmark``; a module whose tests are of several tiers
has no tier in its ``pytestmark`` and is listed in MIXED below instead. ``pytest -m unit`` is the quick loop.
"""

from __future__ import annotations

import json

import pytest
import yaml

from helpers.corpus import base_config, stdlib_docstrings

TIERS = ("unit", "dist", "slurm", "slow")

MIXED: dict[str, tuple[str, dict[str, str]]] = {
    # module: (the tier of its tests not named here, {test function: its tier})
    "test_cli.py": ("unit", {"test_help_imports_no_command_module": "slow"}),
    "test_config_and_plan.py": ("unit", {
        "test_cli_reports_config_errors_without_traceback": "slow",
        "test_plan_json_matches_table_2_1": "slow",
        "test_plan_unknown_preset_is_one_line": "slow",
    }),
    "test_corpus.py": ("slow", {"test_shipped_data_configs_are_valid": "unit"}),
    "test_dedup.py": ("unit", {"test_cli_end_to_end": "slow", "test_bad_inputs_name_the_file": "slow"}),
    "test_evaluate.py": ("unit", {"test_eval_end_to_end_json_stdout_and_mlflow": "slow"}),
    "test_finetune.py": ("unit", {"test_finetuning_beats_chance_with_and_without_the_aux_loss": "slow"}),
    "test_generate.py": ("unit", {  # these three share a checkpoint of a real `gptforge train` run
        "test_generate_command_json_and_text": "slow",
        "test_generate_command_greedy_matches_the_model": "slow",
        "test_generate_command_bad_input": "slow",
    }),
    "test_gpu_ready.py": ("unit", {"test_run_sh_refuses_one_rank_per_gpu_on_a_cpu_torch": "slow",
                                   "test_gpu_bench_script_runs_on_cpu_with_only_torch": "slow"}),
    "test_hf_interop.py": ("unit", {
        "test_pipeline_runs_offline_and_generates_our_greedy_tokens": "slow",
        "test_byte_bpe_model_trains_exports_imports_and_resumes": "slow",
    }),
    "test_resume_checks.py": ("unit", {"test_changed_resume_is_refused_then_allowed": "slow"}),
    "test_parallel.py": ("dist", {"test_layout_errors_are_named_before_any_process_group": "unit"}),
    "test_planner.py": ("unit", {
        "test_weights_per_rank_match_fake_process_group": "dist",
        "test_cli_175b_fits_with_tp8_pp16_dp8_and_not_on_one_gpu": "slow",
    }),
    "test_shipped_configs.py": ("unit", {"test_175b_layout_matches_the_sharded_meta_model": "dist"}),
    "test_tokenizer_and_data.py": ("unit", {
        "test_empty_input_fails_and_leaves_nothing": "slow",
        "test_missing_inputs_are_named": "slow",
        "test_tokenizer_cli_and_parquet": "slow",
    }),
    "test_train.py": ("slow", {
        "test_two_rank_data_parallel_matches_one_process": "dist",
        "test_bad_callback_entry_is_a_config_error": "unit",
    }),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config, items):
    problems = []
    for item in items:
        module = item.path.name
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        if module in MIXED:
            if tiers:
                problems.append(f"{module} is in MIXED (tests/conftest.py): its marks must name no tier, got {tiers}")
            default, named = MIXED[module]
            problems += [f"{module}: MIXED names {name!r}, which it does not define"
                         for name in named if not hasattr(item.module, name)]
            tiers = [named.get(item.originalname, default)]
            item.add_marker(tiers[0])
        elif len(tiers) != 1:
            problems.append(f"{item.nodeid}: {len(tiers)} tiers {tiers}; give its module a `pytestmark` of one "
                            f"of {', '.join(TIERS)}, or list it in MIXED (tests/conftest.py)")
    if problems:
        raise pytest.UsageError("test tiers:\n" + "\n".join(sorted(set(problems))))


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(stdlib_docstrings()):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_model(corpus_jsonl, tmp_path_factory) -> str:
    from gptforge.data_prep.tokenization.tokenizer import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([corpus_jsonl], str(prefix), vocab_size=512).model_path


@pytest.fixture(scope="session")
def indexed_prefix(corpus_jsonl, tokenizer_model, tmp_path_factory) -> str:
    from gptforge.data_prep.tokenization.indexed_writer import tokenize_to_indexed

    prefix = str(tmp_path_factory.mktemp("data") / "docs")
    tokenize_to_indexed([corpus_jsonl], prefix, tokenizer_model, progress=False)
    return prefix


@pytest.fixture
def write_config(tmp_path, tokenizer_model, indexed_prefix):
    """write_config(**sections) -> path of a YAML config for the tiny model, sections merged in."""

    def write(name: str = "job.yaml", run_dir=None, **sections) -> str:
        cfg = base_config(run_dir or tmp_path / "run", tokenizer_model, indexed_prefix)
        for section, values in sections.items():
            if values is None:
                cfg.pop(section, None)
            elif isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section] = cfg[section] | values
            else:
                cfg[section] = values
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return write
