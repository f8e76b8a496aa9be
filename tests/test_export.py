"""Export round trip: a real ZeRO-3 checkpoint written by DeepSpeed (gloo, 2 processes) back to a HF folder.

Run as a script (`python test_export.py write OUT LM_DIR PORT`), this file is the writer: two forked ranks
train one step under ZeRO-3, save `OUT/_actor/global_step1` the way OpenRLHF does, and rank 0 saves the
gathered full weights as `expected.safetensors` for the comparison.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _write_rank(rank: int, out: str, lm_dir: str, port: int) -> None:
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    ds_torch_comm.build_shm_op = lambda: None  # a CPU speed-up op compiled on first use; gloo does not need it
    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 8]])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(Path(out) / "_actor"), tag="global_step1")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if rank == 0:
            save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()}, str(Path(out) / "expected.safetensors"))


def _write_checkpoint(out: str, lm_dir: str, port: int) -> int:
    import deepspeed  # noqa: F401  imported once here, inherited by the forked ranks
    import torch.multiprocessing as mp
    import transformers  # noqa: F401

    ctx = mp.get_context("fork")
    ranks = [ctx.Process(target=_write_rank, args=(rank, out, lm_dir, port)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(300)
    return max(abs(p.exitcode if p.exitcode is not None else 1) for p in ranks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory, lm_dir) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    result = subprocess.run(
        [sys.executable, __file__, "write", str(out), str(lm_dir), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_zero3_checkpoint_round_trips_every_weight(zero3_checkpoint, lm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_ext.export import main

    shards = sorted(p.name for p in (zero3_checkpoint / "_actor" / "global_step1").iterdir())
    assert sum("model_states" in s for s in shards) == 2, f"expected two ZeRO-3 ranks, got {shards}"
    out = tmp_path / "hf"
    script = Path(__file__).parents[1] / "scripts" / "export_checkpoint.sh"
    env = {**os.environ, "PYTHON": sys.executable, "BASE_MODEL": str(lm_dir), "DRY_RUN": "1"}
    dry = subprocess.run(["bash", str(script), str(zero3_checkpoint), str(out)], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "openrlhf_ext.export" in dry.stdout
    assert main([str(zero3_checkpoint), str(out), "--base-model", str(lm_dir)]) == 0  # tag from `latest`

    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    exported = AutoModelForCausalLM.from_pretrained(out)
    expected = load_file(str(zero3_checkpoint / "expected.safetensors"))
    initial = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    state = exported.state_dict()
    assert set(state) == set(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], weight, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(initial[n], expected[n]) for n in expected), "the step must have changed the weights"
    assert AutoTokenizer.from_pretrained(out)("In summary:")["input_ids"]

    assert main([str(zero3_checkpoint), str(out), "--base-model", str(lm_dir)]) == 2, "refuses to overwrite"
    assert main([str(zero3_checkpoint / "_actor"), str(tmp_path / "nobase")]) == 2, "shards alone need --base-model"


def test_prefers_openrlhf_hf_folder(zero3_checkpoint, lm_dir, tmp_path):
    import shutil

    from openrlhf_ext.export import export_checkpoint, resolve_tag

    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero3_checkpoint / "_actor", ckpt / "_actor")
    shutil.copytree(lm_dir, ckpt / "global_step1_hf")
    assert resolve_tag(ckpt / "_actor") == "global_step1"
    out = export_checkpoint(ckpt, tmp_path / "out")
    assert '"kind": "hf_checkpoint"' in (out / "export_info.json").read_text()
    assert (out / "model.safetensors").read_bytes() == (lm_dir / "model.safetensors").read_bytes()



@pytest.mark.parametrize("tag", ["../elsewhere", "/abs/global_step1", "global_step1/../../x", "..", "a/b", ""])
def test_latest_tag_must_be_a_plain_folder_name(tmp_path, tag):
    from openrlhf_ext.export import ExportError, resolve_tag

    (tmp_path / "global_step3").mkdir()
    (tmp_path / "latest").write_text(tag + "\n")
    if not tag:
        (tmp_path / "latest").write_text("   ")
    with pytest.raises(ExportError, match="not a plain folder name"):
        resolve_tag(tmp_path)
    with pytest.raises(ExportError, match="--tag"):
        resolve_tag(tmp_path, "../x")
    (tmp_path / "latest").write_text("global_step3\n")
    assert resolve_tag(tmp_path) == "global_step3"

if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "write":
    sys.exit(_write_checkpoint(sys.argv[2], sys.argv[3], int(sys.argv[4])))
