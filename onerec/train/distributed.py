"""Data-parallel training under torchrun: the process group, each rank's shard of a global batch, and the loss whose
DDP-averaged gradient is the one-process gradient of the whole batch.

Legend: B global batch, b this rank's sessions, m items per session, L levels, K codes, E experts, k experts per
token, S decoder tokens (b * m * (L+1)), P world size (processes).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.model.moe import MoEFeedForward, Routing, assignment_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among the training processes; the default is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates and writes checkpoints, the model and the marker."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU (LOCAL_RANK) when training on CUDA with several processes."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str = "auto") -> Iterator[Cluster]:
    """Under torchrun with more than one process, join its process group (gloo on the CPU, nccl on CUDA, each rank
    on its LOCAL_RANK GPU) and yield this rank's Cluster; other ranks than 0 log warnings only. Outside torchrun (or
    with one process) yield the one-process Cluster and touch nothing. On a clean exit every rank meets at a barrier
    before the group is destroyed (without it exits crash now and then); after an error the process just goes down,
    and torchrun stops the other ranks."""
    world = launched_world_size()
    if world <= 1:
        yield Cluster()
        return
    cluster = Cluster(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]))
    kind = resolve_device(device)
    if kind.type == "cuda":
        if cluster.local_rank >= torch.cuda.device_count():
            raise UsageError(f"--nproc: {world} processes on a machine with {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(cluster.local_rank)
    dist.init_process_group(backend="nccl" if kind.type == "cuda" else "gloo")
    quiet = logging.getLogger("onerec")
    level = quiet.level
    if not cluster.is_main:
        quiet.setLevel(logging.WARNING)
    log.info("rank %d of %d (%s)", cluster.rank, world, dist.get_backend())
    yield cluster
    quiet.setLevel(level)
    dist.barrier()
    dist.destroy_process_group()


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """The torchrun command line that runs `python -m module args` in `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, "--", *args]  # "--": torchrun would take `--run` for its own `--run-path`


def shard(batch: int, cluster: Cluster) -> tuple[np.ndarray, float]:
    """This rank's positions in a global batch of `batch` sessions, and their weight.

    Every rank draws the same global batches from the seed and keeps every P-th session from its rank on: the batches
    are sorted by history length, so the ranks get similar lengths (similar padding, similar step times). A rank
    left without a session (a global batch smaller than P, e.g. the last one) takes the first with weight 0.0: it
    still joins DDP's gradient all-reduce, and adds nothing to the loss, its gradient or the statistics."""
    positions = np.arange(cluster.rank, batch, cluster.world_size)
    if len(positions) == 0:
        return np.zeros(1, dtype=np.int64), 0.0
    return positions, 1.0


class RoutingTap:
    """Forward hooks on a model's MoE layers that keep each layer's routing of the training forward passes since
    `take` (not of validation or decoding: eval mode or no grad).

    The hook recomputes `route` on the layer's input: the same gate, softmax and top-k as the layer's own, in the
    autograd graph, so the load-balancing loss can be rebuilt over the global batch (`LocalTerms`)."""

    def __init__(self, model: nn.Module) -> None:
        self.routings: list[Routing] = []
        self.handles = [m.register_forward_hook(self._keep) for m in model.modules() if isinstance(m, MoEFeedForward)]

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: object) -> None:
        assert isinstance(module, MoEFeedForward)
        if module.training and torch.is_grad_enabled():
            self.routings.append(module.route(inputs[0]))

    def take(self) -> list[Routing]:
        routings, self.routings = self.routings, []
        return routings

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class LocalTerms:
    """One rank's part of the global batch's loss: the sums that carry gradients, and the statistics to all-reduce.

    stats (float64, detached): [CE sum, CE positions, then per MoE layer: assignments per expert (E), gate
    probability sums per expert (E), tokens (1)]. Summed over the ranks it is the global batch's."""

    ce_sum: Tensor  # scalar: cross-entropy summed over this rank's code positions (padding, code -1, skipped)
    prob_sums: Tensor  # (layers, E): gate probabilities summed over this rank's decoder tokens
    stats: Tensor  # (2 + layers * (2E + 1),) float64
    top_k: int


def local_terms(logits: Tensor, targets: Tensor, routings: Sequence[Routing], weight: float = 1.0) -> LocalTerms:
    """logits (b, m, L, K), targets (b, m, L) with -1 for padding, the MoE layers' routings of the same forward, and
    the shard's weight (0.0: a stand-in session that must count for nothing)."""
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1,
                             reduction="sum") * weight
    count = (targets >= 0).sum().to(torch.float64) * weight
    parts = [ce_sum.detach().to(torch.float64).reshape(1), count.reshape(1)]
    prob_sums = []
    for routing in routings:
        assigned = assignment_matrix(routing.probs, routing.experts).sum(0) * weight  # (E,)
        probs = routing.probs.sum(0) * weight  # (E,)
        tokens = torch.tensor([routing.probs.shape[0] * weight], dtype=torch.float64, device=logits.device)
        parts += [assigned.detach().to(torch.float64), probs.detach().to(torch.float64), tokens]
        prob_sums.append(probs)
    top_k = routings[0].experts.shape[1] if routings else 1
    stacked = torch.stack(prob_sums) if prob_sums else logits.new_zeros((0, 0))
    return LocalTerms(ce_sum=ce_sum, prob_sums=stacked, stats=torch.cat(parts), top_k=top_k)


def combine(terms: LocalTerms, total: Tensor, world_size: int, aux_coef: float) -> tuple[Tensor, float, float]:
    """(the loss this rank backpropagates, the global batch's mean CE, its MoE aux loss) from this rank's terms and
    the statistics summed over all ranks (`total`).

    One process minimises CE + coef * aux over the whole batch: CE the mean over its code positions, aux the sum
    over layers of E * sum_e f_e * P_e (f_e the share of the S*k token->expert assignments that go to e, a count
    with no gradient; P_e the mean gate probability; `onerec.model.moe.load_balancing_loss`). Neither is the mean of
    per-rank means: the ranks' position counts differ (padding, an uneven last batch) and f * P is not linear. So
    each rank backpropagates P * (its CE sum / all positions + coef * sum over layers of E * sum_e f_e(global) *
    its probability sums_e / all tokens): summed over the ranks that is the one-process loss, and DDP's gradient
    (the mean over ranks) is its gradient."""
    ce_total, count = total[0], total[1]
    loss = terms.ce_sum / count.to(terms.ce_sum.dtype)
    aux_value = 0.0
    layers = terms.prob_sums.shape[0]
    if layers:
        per_layer = total[2:].reshape(layers, -1)
        n_experts = terms.prob_sums.shape[1]
        assigned, probs, tokens = per_layer[:, :n_experts], per_layer[:, n_experts:-1], per_layer[:, -1:]
        f = (assigned / (tokens * terms.top_k)).to(terms.prob_sums.dtype)  # (layers, E)
        aux = n_experts * (f * terms.prob_sums / tokens.to(terms.prob_sums.dtype)).sum()
        loss = loss + aux_coef * aux
        aux_value = float((n_experts * (assigned / (tokens * terms.top_k)) * (probs / tokens)).sum())
    return loss * world_size, float(ce_total / count), aux_value


def global_loss(logits: Tensor, targets: Tensor, routings: Sequence[Routing], weight: float, aux_coef: float,
                cluster: Cluster) -> tuple[Tensor, float, float]:
    """`combine` with the statistics all-reduced over the process group (one small all-reduce per step)."""
    terms = local_terms(logits, targets, routings, weight)
    total = terms.stats.clone()
    dist.all_reduce(total)
    return combine(terms, total, cluster.world_size, aux_coef)
