"""The engine across real processes: SIGKILL + resume (bit-exact), Ctrl-C, and 2-process DDP over gloo."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _engine_tiny import cli_env, model_state, tiny_overrides, train_cmd


def _logged_step(run: Path) -> int:
    """The newest iteration in a run's metrics.csv (0 if none yet)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        return max((int(r["step"]) for r in csv.DictReader(f) if r.get("step", "").isdigit()), default=0)


def _start_and_signal(cmd: list[str], run: Path, after_step: int, sig: int, group: bool = False,
                      timeout: float = 240) -> subprocess.Popen:
    """Start ``cmd`` and send ``sig`` as soon as its metrics.csv shows iteration ``after_step`` (to its whole
    process group with ``group``, as a terminal's Ctrl-C does)."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    deadline = time.monotonic() + timeout
    while _logged_step(run) < after_step:
        assert proc.poll() is None, f"training ended before iteration {after_step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "training too slow"
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return proc


def test_sigkill_then_resume_is_bit_exact(tiny_synth: Path, tmp_path: Path) -> None:
    """A run SIGKILLed mid-epoch and resumed with --resume auto ends with the uninterrupted run's weights.

    The reference and the resumed runs train in this process, the killed one in a subprocess (the same
    code, one thread each: CPU kernels are then deterministic).
    """
    from cgpn.config import load_config
    from cgpn.engine.trainer import train

    extra = {"engine.checkpoint_steps": 4}  # checkpoints at iterations 4 and 8 (mid-epoch) and 6, 12 (epoch ends)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # killed after iteration 9 shows up: the newest checkpoint is then iteration 8 (epoch 2, batch 2 of 6)
    proc = _start_and_signal(train_cmd(tiny_overrides(tiny_synth, broken, **extra)), broken, 9, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = _logged_step(broken)
    assert killed_at < 12, "the run finished before the kill; nothing was tested"

    train(load_config(None, tiny_overrides(tiny_synth, whole, **extra)))
    train(load_config(None, tiny_overrides(tiny_synth, broken, **extra)), resume="auto")

    a, b = model_state(whole / "last.pt"), model_state(broken / "last.pt")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"killed after iteration {killed_at}: {len(differing)} tensors differ, e.g. {differing[:3]}"
    sa = torch.load(whole / "last.pt", weights_only=True)
    sb = torch.load(broken / "last.pt", weights_only=True)
    assert (sa["step"], sb["step"]) == (12, 12)
    momenta = [(x["momentum_buffer"], y["momentum_buffer"])
               for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values())]
    assert momenta and all(torch.equal(x, y) for x, y in momenta)
    assert sa["epoch_losses"] == sb["epoch_losses"]  # the per-epoch means too: partial sums were restored


def test_ctrl_c_saves_and_exits_cleanly(tiny_synth: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group: the trainer and its 2 loader workers): the iteration finishes,
    a checkpoint of that position is written, exit status 130."""
    run = tmp_path / "run"
    proc = _start_and_signal(train_cmd(tiny_overrides(tiny_synth, run, **{"data.workers": 2})), run, 2,
                             signal.SIGINT, group=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and err.count("SIGINT: stopping") == 1
    state = torch.load(run / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 12  # no checkpoint_steps set: this one exists only because of Ctrl-C
    assert state["step"] == _logged_step(run)  # saved after the last completed iteration
    assert (state["epoch"], state["batch"]) == divmod(state["step"], 6)


def test_a_second_run_in_a_busy_folder_stops_naming_the_first(tiny_synth: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Issue 13: two ``cgpn train --resume auto`` into one output_dir both exited 0, the second replacing the
    first's checkpoints and metrics. Now the second stops in one line naming the first (pid, host, start time)
    before it reads or writes anything there; the first trains on; the lock goes when its process is killed."""
    import yaml

    from cgpn.cli import main
    from cgpn.files import lock_folder

    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(tiny_overrides(tiny_synth, run, **{"solver.epochs": 1000,
                                                                         "engine.checkpoint_steps": 1}),
                                       "--resume", "auto"),
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while _logged_step(run) < 2:  # training, and saving a checkpoint at every iteration
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "training too slow"
            time.sleep(0.05)
        second = tiny_overrides(tiny_synth, run, **{"solver.epochs": 1000, "solver.lr": 0.5})
        code = main(["-q", "train", *(a for s in second for a in ("--set", s)), "--resume", "auto"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"output_dir '{run}' is in use by another process (pid {first.pid} on host {socket.gethostname()}, " \
               f"started " in err and "cgpn -q train" in err and "choose another folder with --set output_dir" in err
        step = _logged_step(run)
        while _logged_step(run) <= step:  # the first run goes on
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "training too slow"
            time.sleep(0.05)
        assert yaml.safe_load((run / "config.yaml").read_text())["solver"]["lr"] == 0.01  # the first's settings
    finally:
        first.kill()
        first.wait(timeout=60)
    with lock_folder(run, "output_dir"):  # released with the killed process
        pass


def test_a_fresh_run_into_a_busy_folder_stops_before_writing(tiny_synth: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A fresh start (no --resume) into a folder another process holds: one line naming the holder, and not a
    file written (the holder has no checkpoint yet, so only the lock can tell)."""
    from cgpn.cli import main

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom cgpn.files import lock_folder\n"
                               "with lock_folder(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()",
                               str(run)], env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["-q", "train", *(a for s in tiny_overrides(tiny_synth, run) for a in ("--set", s))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"is in use by another process (pid {holder.pid} on host {socket.gethostname()}" in err
        assert sorted(p.name for p in run.iterdir()) == [".cgpn-lock"]
    finally:
        holder.kill()
        holder.wait(timeout=60)


# --- DDP -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_check(rank: int, out: str) -> None:
    """The triplet term mined over both processes on fixed features: both ranks draw both ranks' features,
    each feeds its own."""
    from cgpn.config import LossConfig
    from cgpn.engine.distributed import gather_across_processes
    from cgpn.losses import CGPNLoss
    from cgpn.model.cgpn import CGPNOutput

    feats, targets = _gather_inputs()
    mine = feats[8 * rank : 8 * rank + 8].clone().requires_grad_(True)
    output = CGPNOutput(features={}, logits={"g1": torch.zeros(8, 6)}, triplet_features=[mine], supervision=[])
    loss, terms = CGPNLoss(LossConfig(), gather=gather_across_processes)(output, targets[8 * rank : 8 * rank + 8])
    loss.backward()
    torch.save({"triplet": terms["triplet"], "grad": mine.grad}, f"{out}/gather{rank}.pt")


def _gather_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
    return feats, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3, 4, 4, 5, 5])  # ids 2, 3 on both ranks


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list[str], out: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then the library's own ``train``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from cgpn.config import load_config
    from cgpn.engine.trainer import train

    torch.distributed.init_process_group("gloo")  # train() joins a group that exists
    _gather_check(rank, out)
    result = train(load_config(None, overrides))
    torch.save({n: p.detach().clone() for n, p in result.model.named_parameters()}, f"{out}/params{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_in_sync(tiny_synth: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo, global triplet scope): parameters identical on both ranks after training,
    changed from the initial ones, only rank 0 wrote the run folder; the gathered triplet loss equals
    fast-reid's on the union of the ranks' batches, with each rank's gradient."""
    from _fastreid_triplet import fastreid_triplet_loss
    from cgpn.config import load_config
    from cgpn.data.datasets import build_dataset
    from cgpn.engine.checkpoint import build_model_from_config

    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_synth, run, **{"solver.epochs": 1, "engine.triplet_scope": "global",
                                                  "engine.tensorboard": "true", "engine.device": "cpu"})
    mp.start_processes(_ddp_worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0), "ranks drifted apart"

    torch.manual_seed(0)  # engine.seed: the same initial network as the run's
    cfg = load_config(None, overrides)
    init = build_model_from_config(cfg, build_dataset("synthetic", tiny_synth).num_train_pids).state_dict()
    assert sum(not torch.equal(init[k], p0[k]) for k in p0) > 0.9 * len(p0)  # nearly every tensor trained

    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 3  # 6 single-process batches per epoch, split over 2 ranks
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    with (run / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["tag"] == "train/total"]
    assert steps == [1, 2, 3]

    # engine.triplet_scope=global on fixed features: the loss of the 16-image union, per fast-reid
    feats, targets = _gather_inputs()
    feats.requires_grad_(True)
    ref = fastreid_triplet_loss(feats, targets, margin=1.2, norm_feat=False, hard_mining=True)
    ref.backward()
    r0, r1 = torch.load(tmp_path / "gather0.pt"), torch.load(tmp_path / "gather1.pt")
    assert r0["triplet"] == pytest.approx(ref.item(), rel=1e-6) and r1["triplet"] == pytest.approx(ref.item(), rel=1e-6)
    # both ranks backpropagate the same loss, so each holds twice the gradient w.r.t. its own features;
    # DDP's averaging over the 2 ranks then gives the gradient of the one big batch's loss
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]), 2 * feats.grad, rtol=1e-5, atol=1e-7)


def _ddp_resume_worker(rank: int, world_size: int, port: int, overrides: list[str], out: str) -> None:
    """Resume under torchrun as on machines without a shared disk: only rank 0 may read the checkpoint."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import cgpn.engine.trainer as trainer_module
    from cgpn.config import load_config

    if rank != 0:
        def unreadable(path):
            raise AssertionError(f"rank {rank} read {path}: its machine need not have it")

        trainer_module.load_checkpoint = unreadable
    torch.distributed.init_process_group("gloo")
    result = trainer_module.train(load_config(None, overrides), resume="auto")
    torch.save({n: p.detach().clone() for n, p in result.model.named_parameters()}, f"{out}/resumed{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_resume_from_rank_0s_checkpoint(tiny_synth: Path, tmp_path: Path) -> None:
    """Epoch 1 in one process, epoch 2 resumed by 2 gloo processes: rank 0 reads the checkpoint and sends
    it; both ranks end identical, and trained on from the checkpoint."""
    from cgpn.config import load_config
    from cgpn.engine.trainer import train

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_synth, run, **{"solver.epochs": 1})))
    epoch1 = torch.load(run / "last.pt", weights_only=True)["model"]
    overrides = tiny_overrides(tiny_synth, run, **{"solver.epochs": 2, "engine.device": "cpu"})
    mp.start_processes(_ddp_resume_worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = torch.load(tmp_path / "resumed0.pt"), torch.load(tmp_path / "resumed1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks drifted apart"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert sum(not torch.equal(epoch1[k], r0[k]) for k in r0) > 0.9 * len(r0)


def test_the_readmes_torchrun_command_trains_and_reports_once(tiny_synth: Path, tmp_path: Path) -> None:
    """README: `torchrun --nproc_per_node N -m cgpn train ...`, here with 2 CPU processes: one report (rank 0's),
    half the single-process steps per epoch, one run folder."""
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_synth, run, **{"solver.epochs": 1, "engine.eval_at_start": "false",
                                                  "engine.device": "cpu"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *train_cmd(overrides)[1:]]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained (epoch 1)") == 1 and done.stdout.count("checkpoint: ") == 1, done.stdout
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 3  # 6 single-process batches per epoch, split over 2 ranks
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
