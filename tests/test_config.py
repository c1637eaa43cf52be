import dataclasses

import pytest

from hybrid_lora import ExperimentConfig


def test_defaults_equal_the_paper():
    c = ExperimentConfig()
    assert (c.model_name, c.r, c.lora_alpha, c.lora_dropout, c.target_modules) == \
        ("openai-community/gpt2", 64, 32, 0.05, ("attention",))
    assert (c.max_length, c.batch_size, c.epochs_stage1, c.epochs_stage2, c.lr) == (128, 8, 3, 3, 5e-5)
    assert (c.lambda_order, c.lambda_dc, c.rank_schedule) == (1e-4, 0.1, (64, 32, 16))
    assert (c.n_train, c.n_eval, c.data_seed, c.seeds) == (3000, 1000, 42, (42, 43, 44))
    assert c.domains == ("imdb", "yelp") and c.data_source == "hub"
    assert c.methods == ("lora", "dylora", "dc", "hybrid")
    assert ExperimentConfig.paper() == c


@pytest.mark.parametrize("changes, field, value", [
    (dict(rank_schedule=(64, 16, 32)), "rank_schedule", "(64, 16, 32)"),
    (dict(rank_schedule=(128, 32, 16)), "rank_schedule", "128"),
    (dict(rank_schedule=(64, 32, 0)), "rank_schedule", "0"),
    (dict(batch_size=0), "batch_size", "0"),
    (dict(max_length=-5), "max_length", "-5"),
    (dict(methods=("lora", "bogus")), "methods", "bogus"),
    (dict(domains=("imdb", "netflix")), "domains", "netflix"),
    (dict(r=0, rank_schedule=(1, 1, 1)), "r", "0"),
    (dict(rebuild_scaling="double"), "rebuild_scaling", "double"),
    (dict(data_source="local"), "data_dir", "None"),
])
def test_validation_names_field_and_value(changes, field, value):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(ExperimentConfig(), **changes)
    assert field in str(err.value) and value in str(err.value)


def test_schedule_length_must_match_stage2_epochs():
    with pytest.raises(ValueError, match="epochs_stage2=4"):
        dataclasses.replace(ExperimentConfig(), epochs_stage2=4)


def test_lists_become_tuples_and_round_trip_through_dict():
    c = dataclasses.replace(ExperimentConfig.smoke(), seeds=[1, 2], target_modules=["c_attn"])
    assert c.seeds == (1, 2) and isinstance(c.target_modules, tuple)
    d = c.to_dict()
    assert d["seeds"] == [1, 2]
    assert ExperimentConfig.from_dict({**d, "method": "lora", "seed": 1}) == c


def test_overrides_are_coerced_to_field_types():
    c = ExperimentConfig().with_overrides(
        {"lambda_dc": "0.5", "rank_schedule": "64,16,8", "n_train": "10", "data_dir": "none",
         "methods": "lora,dc"})
    assert c.lambda_dc == 0.5 and c.rank_schedule == (64, 16, 8) and c.n_train == 10
    assert c.data_dir is None and c.methods == ("lora", "dc")
    with pytest.raises(ValueError, match="unknown ExperimentConfig field 'lamda_dc'"):
        ExperimentConfig().with_overrides({"lamda_dc": "1"})
    with pytest.raises(ValueError, match="n_train=ten"):
        ExperimentConfig().with_overrides({"n_train": "ten"})


def test_bool_overrides_read_words_not_truthiness():
    assert ExperimentConfig().with_overrides({"keep_checkpoints": "false"}).keep_checkpoints is False
    assert ExperimentConfig().with_overrides({"keep_checkpoints": "True"}).keep_checkpoints is True
    with pytest.raises(ValueError, match="keep_checkpoints=maybe"):
        ExperimentConfig().with_overrides({"keep_checkpoints": "maybe"})
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        dataclasses.replace(ExperimentConfig(), checkpoint_every=-1)
