"""Quantization split over processes with torch.distributed (launched by `torchrun`, one or many nodes).

DAQ calibrates each layer on full-precision inputs, and the statistics it needs are sums, so:

- the calibration blocks are split into contiguous shares, one per rank, and every rank walks the
  layers on its own share's hidden states (`share`);
- per layer, the input second moments are summed along the ranks in order (`chain_moments`: rank r
  continues rank r-1's running sums over its own blocks), which is exactly the order one process
  adds them in, so the checkpoint is bit-identical to a single process's; the last rank then sends
  the sums to all;
- each group of linears reading one input is quantized by one owner (`owners`: greedy bin packing on
  the work, N K + K^2 per linear), and only the packed results travel, to rank 0 (`gather`), which
  alone writes the checkpoint, the report and the resume store.

Without `torchrun` (no WORLD_SIZE in the environment) `Ranks` is the single process, and every
method here is a no-op or the identity.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from daq_vllm.errors import DAQError

from .moments import SecondMoments
from .options import QuantizeOptions

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the quantizing processes."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that reads the resume store and writes the checkpoint."""
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Ranks:
        """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); alone without one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        # torchrun stops the others with SIGTERM when one rank fails: unwind, so the leader's
        # temporary output is removed and its finished layers stay for --resume.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return cls(dist.get_rank(), dist.get_world_size())

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n calibration blocks."""
        if n < self.world:
            raise DAQError(f"--nsamples {n} is fewer than the {self.world} processes; give each at least one block")
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def owners(self, groups: dict[str, list[tuple[int, int]]]) -> dict[str, int]:
        """The rank that quantizes each group of linears (keyed by their input; shapes [N, K] each):
        the largest work first, to the least loaded rank (the lowest on ties)."""
        load = [0] * self.world
        owner = {}
        work = {g: sum(n * k + k * k for n, k in shapes) for g, shapes in groups.items()}
        for group in sorted(work, key=lambda g: (-work[g], g)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[group], load[rank] = rank, load[rank] + work[group]
        return owner

    def chain_moments(self, moments: SecondMoments, accumulate: Callable[[], T]) -> T:
        """Run `accumulate()` (this rank's forward pass, feeding `moments`) as a link of the chain:
        start from rank r-1's running sums, hand them on to rank r+1; then every rank holds the
        last rank's, the sums over all blocks in block order. Returns what `accumulate` returns."""
        if self.world == 1:
            return accumulate()
        if self.rank > 0:
            moments.continue_from(_receive(self.rank - 1))
        result = accumulate()
        last = self.world - 1
        if self.rank < last:
            _send(moments.running_state(), self.rank + 1)
        moments.continue_from(_broadcast(moments.running_state() if self.rank == last else None, last))
        return result

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` at the leader (in rank order); None elsewhere."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.leader else None
        dist.gather_object(obj, out, dst=0)
        return out

    def from_leader(self, obj: Any) -> Any:
        """The leader's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def check_distributed(opts: QuantizeOptions, world: int) -> None:
    """Refuse, on every rank, what a run over several processes cannot do."""
    if world == 1:
        return
    if opts.ldra is None:
        raise DAQError(f"--method {opts.init.method} has no calibration to split over {world} processes; "
                       "run it in one process (without --nproc or torchrun)")
    if opts.sequential:
        raise DAQError("--sequential feeds each layer the quantized previous layers' outputs of every block, which "
                       "no process of a distributed run holds; drop --sequential or run one process")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


State = tuple[dict[str, list[torch.Tensor]], dict[str, int], dict[str, str]]


def _meta(state: State) -> tuple[dict[str, list[tuple[list[int], torch.dtype]]], dict[str, int], dict[str, str]]:
    sums, tokens, alias = state
    return {n: [(list(t.shape), t.dtype) for t in ts] for n, ts in sums.items()}, tokens, alias


def _allocate(meta: Any, device: torch.device) -> State:
    shapes, tokens, alias = meta
    return {n: [torch.empty(s, dtype=d, device=device) for s, d in ts] for n, ts in shapes.items()}, tokens, alias


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _send(state: State, dst: int) -> None:
    dist.send_object_list([_meta(state)], dst=dst)
    for ts in state[0].values():
        for t in ts:
            dist.send(t.contiguous(), dst=dst)


def _receive(src: int) -> State:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src)
    state = _allocate(box[0], _device())
    for ts in state[0].values():
        for t in ts:
            dist.recv(t, src=src)
    return state


def _broadcast(state: State | None, src: int) -> State:
    box: list[Any] = [_meta(state) if state is not None else None]
    dist.broadcast_object_list(box, src=src)
    if state is None:
        state = _allocate(box[0], _device())
    for ts in state[0].values():
        for t in ts:
            dist.broadcast(t, src=src)
    return state
