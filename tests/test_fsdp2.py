"""FSDP2 under torchrun (two CPU processes, gloo) with each of the model's switches: trains, saves a model that
loads and answers, and resumes from its sharded checkpoint."""

import json
import os
import subprocess
import sys

import pytest
from conftest import solid

import sparkles
from sparkles.config import SamplingParams
from sparkles.conversation import Conversation, user_message

SWITCHES = {
    "imagebind": ["model.adapter.kind=imagebind"],
    "llama-adapter": ["model.adapter.kind=llama-adapter"],
    "cross-attention+lora": ["model.connector=resampler", "model.cross_attention.every=1", "model.lora.r=4",
                             "model.lora.targets=q_proj,v_proj,to_q,to_kv,ff_in", "optim.lr_lm=1e-3"],
    "mmca": ["model.attention=mmca"],
    "tiles": ["model.tiles.grid=2,2", "data.max_len=2048"],
}


def torchrun(out, *items):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sparkles.cli", "train",
         "--preset", "tiny", "data=world:dialogue", f"out={out}", "strategy=fsdp2", "optim.batch_size=2",
         "save_every=2", *items], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_fsdp2_trains_each_switch_and_saves_a_model_that_answers(name, tmp_path):
    result = torchrun(tmp_path / "run", "max_steps=2", *SWITCHES[name])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] is not None for r in rows)
    model, processor = sparkles.load(str(tmp_path / "run" / "model"))
    answer = sparkles.Chat(model, processor).answer(
        Conversation((user_message("Describe <image>.", [solid("red")]),)), SamplingParams(max_new_tokens=4))
    assert isinstance(answer, str)
    if name == "llama-adapter":  # and a sharded checkpoint resumes, here with adapters in it
        more = torchrun(tmp_path / "run", "max_steps=3", *SWITCHES[name], "--resume")
        assert more.returncode == 0, more.stderr[-3000:]
        assert "resuming from" in more.stderr
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
