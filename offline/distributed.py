"""Quantization split over processes with torch.distributed (launched by `torchrun`, one or many nodes).

DAQ calibrates each layer on full-precision inputs, and the statistics it needs are sums, so:

- the calibration blocks are split into contiguous shares, one per rank, and every rank walks the
  layers on its own share's hidden states (`share`);
- per layer, the input second moments are summed along the ranks in order (`receive_sums`, then the
  rank's own blocks, then `pass_on`: rank r continues rank r-1's running sums), which is exactly the
  order one process adds them in, so the checkpoint is bit-identical to a single process's; the last
  rank then tells every rank the token counts and which linears share an input, and sends each
  input's sums to the one rank that quantizes its readers (`final_sums`);
- the chain is pipelined over the layers: rank r feeds layer j forward while rank r-1 already feeds
  layer j+1 (`lag`), so the ranks' forward passes run at the same time rather than one after another;
- each group of linears that read one input or share a codebook is quantized by one owner
  (`owners`: greedy bin packing on the work, N K + K^2 per linear), and only the packed results
  travel, to rank 0 (`gather`), which alone writes the checkpoint, the report and the resume store.

Without `torchrun` (no WORLD_SIZE in the environment) `Ranks` is the single process, and every
method here is a no-op or the identity.
"""

from __future__ import annotations

import os
import pickle
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from daq_vllm.errors import DAQError

from .moments import SecondMoments
from .options import QuantizeOptions


@dataclass(frozen=True)
class Ranks:
    """This process's place among the quantizing processes."""

    rank: int = 0
    world: int = 1
    # The chain's own process group: a send still pending on it (taken a step later) cannot hold up
    # the transfers of `final_sums` behind it, as it would on one NCCL stream per pair of ranks.
    chain: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    _sending: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list, init=False, compare=False, repr=False)

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
        return cls(dist.get_rank(), dist.get_world_size(), dist.new_group())

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

    @property
    def lag(self) -> int:
        """How many layers behind rank 0 the last rank feeds: rank r is r layers behind."""
        return self.world - 1

    @property
    def last(self) -> bool:
        """The rank that completes each layer's sums, and so the one that quantizes it in the step it fed it."""
        return self.rank == self.world - 1

    def receive_sums(self, moments: SecondMoments) -> None:
        """Before this rank's blocks pass through a layer: continue rank r-1's running sums of it."""
        if self.rank > 0:
            moments.continue_from(_receive(self.rank - 1, self.chain))

    def pass_on(self, moments: SecondMoments) -> None:
        """After this rank's blocks passed through a layer: send the running sums on to rank r+1,
        without waiting for it to take them (it is a layer behind); `wait_sent` ends the sends."""
        if not self.last:
            self._sending.extend(_isend(moments.running_state(), self.rank + 1, self.chain))

    def wait_sent(self) -> None:
        """Wait until rank r+1 received what `pass_on` sent, and free it."""
        for work, _ in self._sending:
            work.wait()
        self._sending.clear()

    def final_sums(self, moments: SecondMoments, owners: Callable[[SecondMoments], dict[str, int]]) -> dict[str, int]:
        """Hand a layer's complete sums (in `moments` on the last rank) to the ranks that use them.

        Every rank learns the token counts and shared inputs, then `owners(moments)`, the rank that
        quantizes the readers of each input; each input's sums go from the last rank to its owner,
        and every rank keeps only the sums of the inputs it owns. Returns the owners.
        """
        if self.world == 1:
            return owners(moments)
        last = self.world - 1
        box = [_meta(moments.running_state()) if self.last else None]
        dist.broadcast_object_list(box, src=last)
        shapes, tokens, alias = box[0]
        if not self.last:
            moments.continue_from(({}, tokens, alias))
        owner = owners(moments)
        for key, layout in shapes.items():  # the last rank's order, on every rank
            if owner[key] == last:
                continue
            if self.last:
                for t in moments.sums.pop(key):
                    dist.send(t.contiguous(), dst=owner[key])
            elif owner[key] == self.rank:
                moments.sums[key] = [torch.empty(s, dtype=d, device=_device()) for s, d in layout]
                for t in moments.sums[key]:
                    dist.recv(t, src=last)
        return owner

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
    if opts.asymmetric:
        raise DAQError("--asymmetric feeds each layer the quantized previous layers' outputs of every block, which "
                       "no process of a distributed run holds; drop --asymmetric or run one process")


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


def _isend(state: State, dst: int, group: dist.ProcessGroup | None) -> list[tuple[dist.Work, torch.Tensor]]:
    """Start sending `state` to `dst`: its layout (pickled), then its tensors; each send with the
    tensor it reads, which must live until the send is waited on."""
    device = _device()
    meta = torch.frombuffer(bytearray(pickle.dumps(_meta(state))), dtype=torch.uint8).to(device)
    size = torch.tensor([meta.numel()], dtype=torch.int64, device=device)
    tensors = [size, meta, *(t.contiguous() for ts in state[0].values() for t in ts)]
    return [(dist.isend(t, dst=dst, group=group), t) for t in tensors]


def _receive(src: int, group: dist.ProcessGroup | None) -> State:
    device = _device()
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, group=group)
    meta = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(meta, src=src, group=group)
    state = _allocate(pickle.loads(meta.cpu().numpy().tobytes()), device)
    for ts in state[0].values():
        for t in ts:
            dist.recv(t, src=src, group=group)
    return state
