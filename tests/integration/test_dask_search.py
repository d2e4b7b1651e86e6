"""Search candidate evaluation on a real local Dask cluster of 2 worker processes chooses the same
subnet, with the same scores, as the local runner and as the in-process `run_search`."""
from __future__ import annotations

import time

import pytest
import torch

from tailor.config import DeviceProfile
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of
from tailor.models.tiny import tiny_model
from tailor.search.fanout import ScoreJob, run_search_on, write_inputs
from tailor.search.sampled import run_search

pytestmark = pytest.mark.integration


def test_dask_cluster_of_two_chooses_the_same_subnet_as_local(tmp_path):
    pytest.importorskip("dask.distributed")
    supernet = tiny_model(seed=0, n_layers=4)
    supernet.save_pretrained(tmp_path / "model", safe_serialization=True)
    seqs = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    teacher = teacher_logits(tiny_model(seed=1, n_layers=4), seqs, batch_size=4)  # a different model: KL > 0
    job = ScoreJob(str(tmp_path / "model"), str(write_inputs(tmp_path / "inputs.safetensors", seqs, teacher)),
                   fmt="gguf", batch_size=4)
    space = SearchSpace.build(arch_of(supernet), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    dev = DeviceProfile(runtime="llama.cpp", format="gguf", budget_fraction=0.4, bandwidth_gbs=50,
                        compute_tflops=1, allowed_bits=[4, 8, 16], embed_bits=8)

    ref_best, ref = run_search(supernet, space, dev, seqs, teacher, n=12, seed=3, batch_size=4)
    local_best, local = run_search_on(job, space, dev, n=12, seed=3, runner="local")
    t0 = time.perf_counter()
    dask_best, remote = run_search_on(job, space, dev, n=12, seed=3, runner="dask", workers=2)
    print(f"dask: {len(remote)} candidates on 2 workers in {time.perf_counter() - t0:.1f} s (cluster start included)")

    assert len(ref) == len(local) == len(remote) >= 8
    assert len({c.kl for c in remote}) > 1, "candidates must differ, or the choice proves nothing"
    assert [c.config.hash for c in remote] == [c.config.hash for c in local] == [c.config.hash for c in ref]
    assert dask_best.config.hash == local_best.config.hash == ref_best.config.hash
    # Worker processes run torch single-threaded, this process with 2 threads: the same kernels reduce
    # in the same order per output element, so the scores agree exactly, not just closely.
    assert [(c.kl, c.val_loss) for c in remote] == [(c.kl, c.val_loss) for c in local]
    assert [(c.kl, c.val_loss) for c in local] == [(c.kl, c.val_loss) for c in ref]
