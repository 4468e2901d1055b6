"""Data-parallel training (gmbench.run.launcher, gmbench.run.ranks): 2 gloo ranks on CPU against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmbench.run.launcher import free_port, run_cell_on_ranks
from gmbench.errors import GmbenchError
from gmbench.run.cell import RunOptions, run_cell
from gmbench.run.ranks import DistributedContext
from gmbench.suite import parse_suite
from gmbench.training import TrainConfig, train

# 61 training samples in global batches of 21: 21, 21, 19 -> shards of 11/10, 11/10, 10/9,
# so the loss rescaling for unequal shards is exercised.
SUITE = """
name: ddp
plugins: [runner_plugins]
cell:
  dataset: test_blobs
  dataset_params: {n_train: 61, n_test: 31}
  model: test_meanpool
  input: points
  n_points: 24
  training: {epochs: 3, batch_size: 21}
matrix:
  model_params.fail: [false, true]
"""

# What gmbench.run.ranks.destroy_process_group warns when the group outlives it (its
# backend's threads then run into interpreter shutdown and can abort the rank there).
STILL_REFERENCED = "still referenced after destroy_process_group"

# In a fresh interpreter (nothing imported yet that could hide the bug): join a one-rank
# gloo group, build DDP (it imports torch.distributed.nn lazily), train a step, reduce a
# Python tensor, leave.  Prints the native thread counts before joining, before leaving
# and after leaving, and whether destroy_process_group freed the group.
LEAVE_THE_GROUP = """
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from gmbench.run import ranks

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(1)
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
before = threads()
ranks.init_process_group("cpu")
model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
model(torch.randn(4, 3)).sum().backward()
dist.all_reduce(torch.ones(2))
del model
joined = threads()
released = ranks.destroy_process_group()
print(before, joined, threads(), released)
"""


@pytest.fixture(scope="module")
def cells():
    return parse_suite(SUITE, "ddp.yaml").cells


def test_shards_cover_the_global_batch_in_order():
    batch = torch.arange(21)
    shards = [DistributedContext(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert [len(s) for s in shards] == [7, 7, 7]
    assert torch.equal(torch.cat(shards), batch)
    uneven = [DistributedContext(rank=r, world_size=2).shard(torch.arange(19)) for r in range(2)]
    assert [len(s) for s in uneven] == [10, 9]
    with pytest.raises(GmbenchError, match="nproc-per-node"):
        DistributedContext(rank=0, world_size=4).shard(torch.arange(3))


def test_averaging_rescaled_shard_gradients_gives_the_global_batch_gradient():
    """What DDP does (average the ranks' gradients) equals the single-process gradient."""
    torch.manual_seed(1)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(19, 3, dtype=torch.float64), torch.randint(0, 4, (19,))
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    world = 2
    summed = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(world):
        context = DistributedContext(rank=rank, world_size=world)
        xs, ys = context.shard(x), context.shard(y)
        loss = context.scale_for_backward(F.cross_entropy(model(xs), ys), len(ys), len(y))
        for total, grad in zip(summed, torch.autograd.grad(loss, list(model.parameters()))):
            total += grad
    for expected, total in zip(reference, summed):
        torch.testing.assert_close(total / world, expected, rtol=1e-12, atol=1e-12)


def test_ranks_other_than_zero_write_nothing(tmp_path):
    """The trainer's writes are gated on rank 0 (here a non-writer without a process group)."""
    x, y = torch.randn(8, 5, 2), torch.arange(8) % 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 2), nn.LogSoftmax(-1))
    config = TrainConfig(epochs=1, batch_size=4, progress=False)
    train(model, x, y, x, y, config, run_dir=tmp_path / "rank1", distributed=DistributedContext(rank=1, world_size=1))
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").iterdir())
    train(model, x, y, x, y, config, run_dir=tmp_path / "rank0", distributed=DistributedContext())
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == {"epochs.jsonl", "checkpoint.pt"}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_leaving_the_group_frees_the_backend_and_its_threads(tmp_path):
    # A group that outlives destroy_process_group keeps gloo's worker threads running into
    # interpreter shutdown, where one that drops a tensor aborts the rank (exit code -6).
    done = subprocess.run([sys.executable, "-c", LEAVE_THE_GROUP, str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before, joined, after, released = done.stdout.split()
    assert int(joined) > int(before)  # the backend had started its threads
    assert (int(after), released) == (int(before), "True"), done.stderr


@pytest.mark.slow
def test_two_gloo_ranks_follow_single_process_training(cells, tmp_path, capfd):
    cell = cells[0]
    single = run_cell(cell.config, tmp_path / "single", RunOptions(plugins=("runner_plugins",)))
    seen = []
    ranks = run_cell_on_ranks(cell.config, tmp_path / "ddp", RunOptions(plugins=("runner_plugins",), nproc_per_node=2), nproc=2, on_epoch=seen.append)

    assert single["status"] == ranks["status"] == "ok", ranks.get("error")
    a, b = _epochs(tmp_path / "single"), _epochs(tmp_path / "ddp")
    assert [r["epoch"] for r in b] == [1, 2, 3] == [r["epoch"] for r in seen]
    # Same global batches and gradients: the curves agree up to summation order.
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-5)
    assert [r["train_accuracy"] for r in b] == [r["train_accuracy"] for r in a]
    assert [r["test_accuracy"] for r in b] == [r["test_accuracy"] for r in a]
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert ranks["test_accuracy"] == single["test_accuracy"] and ranks["params"] == single["params"]
    final = [torch.load(folder / "checkpoint.pt", weights_only=True)["model"] for folder in (tmp_path / "single", tmp_path / "ddp")]
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, rtol=1e-4, atol=1e-6)
    # Rank 0 wrote the cell folder exactly as a single process does.
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {p.name for p in (tmp_path / "single").iterdir()}
    assert STILL_REFERENCED not in capfd.readouterr().err  # the ranks' stderr


@pytest.mark.slow
def test_a_failing_cell_on_ranks_is_recorded_failed_without_hanging(cells, tmp_path, capfd):
    metrics = run_cell_on_ranks(cells[1].config, tmp_path / "cell", RunOptions(plugins=("runner_plugins",), nproc_per_node=2), nproc=2)
    assert metrics["status"] == "failed"
    assert "this model fails on purpose" in metrics["error"]
    assert json.loads((tmp_path / "cell" / "metrics.json").read_text())["status"] == "failed"
    # Rank 1 raised with the DDP wrapper on its traceback's frames; it left the group after
    # letting go of the traceback, so the group was freed there too.
    err = capfd.readouterr().err
    assert "rank 1 failed" in err and STILL_REFERENCED not in err


@pytest.mark.slow
def test_every_rank_trains_with_the_cells_backend_parameters(tmp_path):
    # Ranks above 0 once chose the backend without the suite's backend_params.
    (tmp_path / "records").mkdir()
    suite = parse_suite(
        f"""
name: ddp-backend
plugins: [runner_plugins, backend_probe_plugins]
backend: torch
backend_params: {{cutoff: 1.0e-5, tile_elements: 4096, cpu_kernel: gemm}}
cell:
  dataset: test_blobs
  dataset_params: {{n_train: 8, n_test: 4}}
  model: test_backend_probe
  model_params: {{record_dir: "{tmp_path / 'records'}"}}
  input: points
  n_points: 8
  training: {{epochs: 1, batch_size: 4}}
""",
        "ddp-backend.yaml",
    )
    options = RunOptions(
        plugins=tuple(suite.plugins), backend=suite.backend, backend_params=suite.backend_params, nproc_per_node=2
    )
    metrics = run_cell_on_ranks(suite.cells[0].config, tmp_path / "cell", options, nproc=2)
    assert metrics["status"] == "ok", metrics.get("error")
    records = [json.loads((tmp_path / "records" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["backend"] == "torch"
    settings = records[0]["settings"]
    assert (settings["cutoff"], settings["tile_elements"], settings["cpu_kernel"]) == ("1e-05", "4096", "'gemm'")


def _epochs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "epochs.jsonl").read_text().splitlines()]
