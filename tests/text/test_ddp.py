"""Fine-tuning on several processes (``trainer=ddp``): the settings are checked before any data is
loaded, two CPU processes (gloo) fine-tune to within noise of one, and only fine-tuning runs on
the other ranks (one MLflow run, one registered model)."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_block_world

from recsys.data import LeaveLastOutSplit
from recsys.errors import ConfigError
from recsys.recommender import History
from recsys.text.datamodule import EpochSampler, TextDataModule
from recsys.text.distributed import FineTuneJob, TrainerSpec, check_trainer, fine_tune_ranks

REPO = Path(__file__).resolve().parents[2]

# --- settings that cannot work: a clear error before any data is loaded -------------------------


@pytest.mark.parametrize(
    ("trainer", "env", "message"),
    [
        ({"strategy": "ddp", "devices": 10_000, "accelerator": "cpu"}, {}, "CPU core"),
        ({"strategy": "ddp", "devices": 2, "accelerator": "gpu"}, {}, "CUDA device"),
        ({"strategy": "fsdp", "devices": 1, "accelerator": "cpu"}, {}, "trainer.strategy='fsdp' is not supported"),
        ({"strategy": "ddp_spawn", "devices": 1, "accelerator": "cpu"}, {}, "is not supported"),
        ({"strategy": "auto", "devices": 2, "accelerator": "cpu"}, {}, "need trainer=ddp"),
        ({"strategy": "ddp", "devices": 0, "accelerator": "cpu"}, {}, "trainer.devices must be"),
        ({"strategy": "ddp", "devices": 1, "num_nodes": 2, "accelerator": "cpu"}, {}, "needs a launcher"),
        ({"strategy": "ddp", "devices": 1, "accelerator": "cpu"}, {"WORLD_SIZE": "4", "RANK": "1"}, "WORLD_SIZE"),
        ({"devices": 1, "accelerator": "cpu", "max_epochs": "abc"}, {}, r"trainer\.max_epochs must be .*'abc'"),
        ({"devices": 1, "accelerator": "cpu", "max_epochs": 0}, {}, r"trainer\.max_epochs must be"),
        ({"devices": 1, "accelerator": "cpu", "max_epochs": 2.5}, {}, r"trainer\.max_epochs must be"),
    ],
)
def test_settings_that_cannot_work_are_a_config_error(trainer, env, message):
    if trainer.get("accelerator") == "gpu" and torch.cuda.device_count() >= trainer["devices"]:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ConfigError, match=message):
        check_trainer(trainer, env)


def test_cpu_processes_are_counted_against_the_cores_this_process_may_use(monkeypatch):
    """Regression: the check counted the machine's cores (``os.cpu_count``), so under a batch
    scheduler's or ``taskset``'s allocation of 1 core ``trainer.devices=2`` passed."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    with pytest.raises(ConfigError, match="trainer.devices=2 CPU processes but this process may use 1 CPU core"):
        check_trainer({"strategy": "ddp", "devices": 2, "accelerator": "cpu"}, {})
    check_trainer({"strategy": "ddp", "devices": 1, "accelerator": "cpu"}, {})


def test_layouts():
    assert check_trainer({"devices": 1, "accelerator": "cpu"}, {}).world_size == 1
    for epochs in (16, -1, None):  # a length, unbounded, Lightning's default
        check_trainer({"devices": 1, "accelerator": "cpu", "max_epochs": epochs}, {})
    one_node = check_trainer({"strategy": "ddp", "devices": 2, "accelerator": "cpu"}, {})
    assert (one_node.world_size, one_node.rank, one_node.launched, one_node.is_worker) == (2, 0, False, False)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    launched = check_trainer({"strategy": "ddp", "devices": 2, "num_nodes": 2, "accelerator": "cpu"}, env)
    assert (launched.world_size, launched.rank, launched.local_rank, launched.is_worker) == (4, 3, 1, True)


@pytest.mark.slow
def test_the_job_checks_ddp_settings_before_loading_data(tmp_path):
    """Exit 2 with one line naming the setting; the missing data file is never reached."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "recsys.train", "trainer=ddp", "trainer.devices=10000", "data=files"]
    cmd += [f"data.interactions={tmp_path}/missing.csv", f"data.items={tmp_path}/missing.csv"]
    cmd += [f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.devices=10000" in proc.stderr and "Traceback" not in proc.stderr
    assert "missing.csv" not in proc.stderr


def test_each_rank_draws_its_own_equal_share_of_an_epoch():
    ranks = [list(EpochSampler(100, 30, seed=1, rank=r, replicas=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [30, 30, 30]
    assert len(set(sum(ranks, []))) == 90  # disjoint
    assert ranks[0] == list(EpochSampler(100, 30, seed=1))  # rank 0 draws what one process draws
    assert [len(EpochSampler(100, 64, rank=r, replicas=3)) for r in range(3)] == [33, 33, 33]


def test_vectors_gathered_from_other_ranks_are_cache_hits(tokenizer_path):
    from recsys.text.cache import ItemEmbeddingCache
    from recsys.text.encoder import ItemEncoder

    cache = ItemEmbeddingCache()
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, embedding_cache=cache)
    ids, lengths = encoder.tokenize([f"item {i} text {i * 7}" for i in range(20)])
    elsewhere = encoder._encode_tokens(ids, lengths)  # as another rank computed them
    cache.store(encoder, ids[10:], lengths[10:], elsewhere[10:])
    got = encoder.base_vectors(ids, lengths)
    assert cache.encoded_items == 10  # only this rank's half was encoded here
    torch.testing.assert_close(got, elsewhere, atol=1e-6, rtol=0)


# --- two processes against one --------------------------------------------------------------------


def fine_tune_on(
    devices: int, world, tokenizer_path: str, tmp_path: Path, seed: int = 0, batch: int = 32, epochs: int = 6
):
    """The job's default tower (frozen tiny BERT + adapter) fine-tuned on the block world by
    ``fine_tune_ranks`` on ``devices`` CPU processes; returns its metrics and rank 0's encoder."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from recsys.text.cache import ItemEmbeddingCache
    from recsys.text.encoder import ItemEncoder, TwoTower
    from recsys.text.module import TextTowerModule

    L.seed_everything(seed, verbose=False)
    h = world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, embedding_cache=ItemEmbeddingCache())
    ids, lengths = encoder.tokenize(world.texts)
    net = TwoTower(encoder, max_history=10)
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=train, val=split.val, batch_size=batch, steps_per_epoch=10,
        max_history=10, seed=seed,
    )  # fmt: skip
    factory = partial(TextTowerModule, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)
    config = {
        "_target_": "lightning.Trainer",
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": devices,
        "strategy": "ddp" if devices > 1 else "auto",
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "default_root_dir": str(tmp_path),
    }
    callbacks = [
        ModelCheckpoint(dirpath=tmp_path / f"ckpt{devices}", filename="best", monitor="val/ndcg_at_10", mode="max"),
        EarlyStopping(monitor="val/ndcg_at_10", mode="max", patience=3),
    ]
    job = FineTuneJob(net, dm, factory, TrainerSpec(config, callbacks), None)
    _, metrics, curve = fine_tune_ranks(job, logger=False)
    return metrics, curve, encoder


@pytest.mark.slow
def test_two_processes_fine_tune_within_noise_of_one(tokenizer_path, tmp_path):
    """Two gloo processes with 16 examples each per step against one process with 32: the same
    examples per step and per epoch, so the same training up to how a step's examples are split.

    * The zero-shot validation (before any step) is the same number: every rank encodes half of
      the catalogue and scores half of the validation users, and the sums are combined.
    * Rank 0 encoded only its half of the catalogue at each validation.
    * The fine-tuned NDCG@10 lies within noise of one process. The noise is measured: one process
      trained with three sampling seeds (the order and grouping of examples, which is also what
      two processes change); the two-process score must be within 3 standard deviations of their
      mean (floor 0.01: three seeds can agree by chance). Fine-tuning takes NDCG@10 from ~0.05 to
      ~0.27 here, so the tolerance (~0.02) is a tenth of what training adds.
    """
    world = make_block_world(users_per_block=50)  # 200 validation users
    one = [fine_tune_on(1, world, tokenizer_path, tmp_path / f"one{s}", seed=s, batch=32) for s in range(3)]
    two, curve, encoder = fine_tune_on(2, world, tokenizer_path, tmp_path / "two", seed=0, batch=16)

    zero = [m["text/val_ndcg_at_10_zeroshot"] for m, _, _ in one]
    assert two["text/val_ndcg_at_10_zeroshot"] == pytest.approx(zero[0], abs=1e-6)
    validations = len(curve)  # the zero-shot one, then one per epoch
    assert encoder.embedding_cache.encoded_items == validations * world.n_items // 2

    tuned = np.array([m["text/val_ndcg_at_10_finetuned"] for m, _, _ in one])
    assert tuned.min() > 3 * zero[0]  # training learns: the comparison is not between two untrained towers
    tolerance = max(3 * tuned.std(ddof=1), 0.01)
    assert abs(two["text/val_ndcg_at_10_finetuned"] - tuned.mean()) <= tolerance, (two, tuned)


# --- the README's multi-node command, on one node ------------------------------------------------

README_COMMANDS = [
    "torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 "
    "-m recsys.train +experiment=bert_ranker trainer=ddp trainer.accelerator=gpu trainer.devices=4 trainer.num_nodes=2",
]
(TORCHRUN,) = README_COMMANDS
# Seconds, not minutes: tiny data and BERT, two short epochs, no report.
TINY = [
    "encoder=tiny",
    "data=generated_tiny",
    "data.n_users=150",
    "data.n_items=100",
    "trainer.max_epochs=2",
    "text.data.steps_per_epoch=2",
    "cf.bpr.iterations=5",
    "eval.zeroshot=false",
    "eval.report=false",
]


@pytest.mark.slow
def test_torchrun_runs_the_job_once_and_fine_tunes_on_every_rank(tmp_path):
    """The README's two-node command as one node of two CPU processes: rank 0 runs the job (one
    MLflow run, one registered model), rank 1 only fine-tunes."""
    import mlflow

    from recsys.text.distributed import _free_port
    from recsys.tracking import tracking_uri

    command = (
        TORCHRUN.replace("--nnodes=2 --nproc_per_node=4", "--nnodes=1 --nproc_per_node=2")
        .replace("--master_addr=10.0.0.1 --master_port=29500", f"--master_addr=127.0.0.1 --master_port={_free_port()}")
        .replace(
            "trainer.accelerator=gpu trainer.devices=4 trainer.num_nodes=2", "trainer.accelerator=cpu trainer.devices=2"
        )
        .replace("+experiment=bert_ranker", "+experiment=bert_ranker " + " ".join(TINY))
    )
    assert "10.0.0.1" not in command and "gpu" not in command
    bin_dir = str(Path(sys.executable).parent)  # this venv's torchrun
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [*command.split(), f"paths.root_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "fine-tuning on 2 processes" in log and "rank 1/2: fine-tuning" in log

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlruns"))
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([e.experiment_id for e in experiments])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["text/steps"] >= 2  # trained (text.budget_minutes may end it on a busy machine)
    assert len(client.search_model_versions("name='recsys'")) == 1
    assert len(list(tmp_path.glob("outputs/*/recommendations.parquet"))) == 1
