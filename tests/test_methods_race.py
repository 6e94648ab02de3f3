"""``python -m bench.toy --race --quick``: every preset of the race on the same clock, the same
held-out ODE evaluation, and the JSON and PNG it writes."""
from __future__ import annotations

import json

from PIL import Image

from bench import race, toy


def test_quick_race_writes_the_table_and_the_curves(tmp_path):
    out = tmp_path / "race.json"
    assert toy.main(["--race", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["target"]["preset"] == "dancegrpo"
    assert res["target"]["reward"] == res["race"]["dancegrpo"]["final_reward"]
    assert set(res["race"]) == set(race.QUICK_RACE)
    for name, row in res["race"].items():
        assert {"time_to_target_ratio", "final_reward", "final_reward_std", "model_evaluations", "drift",
                "seeds"} <= set(row), name
        assert row["seeds"] == 1 and row["model_evaluations"] > 0 and row["drift"] >= 0
        # one evaluation before training and at least one after, on the training clock
        assert len(row["curve"]) >= 2 and row["curve"][0]["seconds"] == 0.0
        assert row["curve"][0]["reward"] == res["base_reward"]
        assert row["curve"][-1]["seconds"] >= res["budget_seconds"]
    with Image.open(tmp_path / "race.png") as im:
        assert im.size == (1100, 640)


def test_time_to_target_reads_the_seed_mean_curve():
    runs = {"dancegrpo": [{"curve": [{"seconds": 0.0, "reward": 0.0}, {"seconds": 10.0, "reward": 1.0},
                                     {"seconds": 20.0, "reward": 2.0}],
                           "final_reward": 2.0, "model_evaluations": 100, "drift": 0.1, "iterations": 4,
                           "optimizer_steps": 4}],
            "fast": [{"curve": [{"seconds": 0.0, "reward": 0.0}, {"seconds": 10.5, "reward": 2.5},
                                {"seconds": 20.0, "reward": 3.0}],
                      "final_reward": 3.0, "model_evaluations": 50, "drift": 0.2, "iterations": 4,
                      "optimizer_steps": 4}],
            "slow": [{"curve": [{"seconds": 0.0, "reward": 0.0}, {"seconds": 20.0, "reward": 1.0}],
                      "final_reward": 1.0, "model_evaluations": 80, "drift": 0.0, "iterations": 2,
                      "optimizer_steps": 2}]}
    res = race.summarise(runs, 20.0, 2)
    assert res["target"]["reward"] == 2.0
    assert res["race"]["fast"]["time_to_target_ratio"] == 10.5 / 20.0
    assert res["race"]["slow"]["time_to_target_ratio"] is None
    # a run whose one long iteration crossed two grid times reads the same evaluation at both
    assert [p["reward"] for p in res["race"]["slow"]["curve"]] == [0.0, 1.0, 1.0]
    assert res["race"]["fast"]["final_reward"] == res["race"]["fast"]["curve"][-1]["reward"] == 3.0
