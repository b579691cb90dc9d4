"""One model over several machines, on MLX's distributed engine (`mx.distributed`, started by
`mlx.launch`).

Two ways to split the model:

- ``pipeline``: each rank holds a contiguous run of decoder layers (split by their bytes in the
  checkpoint) and their caches; rank 0 also holds the embedding, the last rank the head. The hc
  streams go from rank to rank with send/recv; the last rank's logits reach every rank through
  an all_sum in which the other ranks add zeros (exact).
- ``experts``: every MoE layer's routed experts are split across ranks; attention, the shared
  expert, the embedding and the head are on every rank. Each rank runs its experts for the
  tokens routed to them; an all_gather brings every rank all shares, which it adds in rank order.

Every rank runs the same generation loop on the same token ids, sees the same logits and
draws from the same random state (seeded from rank 0 at start), so every rank samples the
same token and no sampled token needs to travel. The hash-routed layers read the token ids
each rank already has.

A rank that dies makes the others fail with ``DistributedError`` naming it (in a ring
collective over 3 or more ranks, where MLX does not say which link broke, naming both
neighbours); a rank that stops answering (or a host that never connects at start) makes the
others exit after a timeout with a message naming it (``MLX_DSV4_DIST_TIMEOUT`` seconds,
default 300).
"""

import contextlib
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import ModelCache
from .config import ModelArgs
from .hc import collapse, expand
from .model import Model, layer_caches
from .moe import MoE, RoutedExperts
from .sharding import DistributedError, expert_range, parse_split, pipeline_extras, split_layers
from .streams import split_outputs

MODES = ("pipeline", "experts")
TIMEOUT_ENV = "MLX_DSV4_DIST_TIMEOUT"
BARRIER_ENV = "MLX_DSV4_LOCAL_BARRIER"  # host:port of rank 0's LocalBarrier (set by run_local_ranks)
DEFAULT_TIMEOUT = 300.0
EXIT_NO_ANSWER = 75  # the exit status of a rank whose peer stopped answering

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(?:(\d+)\.)?(w[123])\.(weight|scales|biases)$")


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _rank_names(ranks: Sequence[int]) -> str:
    ranks = sorted(set(ranks))
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + " or ".join(map(str, ranks))


def _is_transport_error(e: BaseException) -> bool:
    text = str(e)
    return "[ring]" in text or "[jaccl]" in text or "peer" in text or "connection" in text.lower()


class Watchdog:
    """Ends the process when a distributed operation waits longer than ``timeout`` seconds.

    MLX releases the GIL while it evaluates, so a Python thread can watch a blocked collective;
    ``busy`` regions nest, the innermost one naming the ranks that are waited on, and ``kick``
    restarts the innermost region's clock (each forward pass does)."""

    def __init__(self, rank: int, timeout: float):
        self.rank = rank
        self.timeout = timeout
        self._regions: List[list] = []  # [deadline, what, peers]
        self._lock = threading.Condition()
        threading.Thread(target=self._watch, name="mlx-dsv4-watchdog", daemon=True).start()

    def _watch(self):
        with self._lock:
            while True:
                if not self._regions:
                    self._lock.wait()
                    continue
                deadline, what, peers = self._regions[-1]
                left = deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(None if left == float("inf") else left)
                    continue
                sys.stderr.write(f"error: rank {self.rank}: {_rank_names(peers)} did not answer within "
                                 f"{self.timeout:g} s while {what} ({TIMEOUT_ENV} sets the limit)\n")
                sys.stderr.flush()
                os._exit(EXIT_NO_ANSWER)

    @contextlib.contextmanager
    def busy(self, what: str, peers: Sequence[int], idle: bool = False):
        """A region that waits on ``peers``; a transport failure inside it becomes a
        DistributedError naming them. An ``idle`` region (waiting for the next request) may
        wait for ever."""
        region = [float("inf") if idle else time.monotonic() + self.timeout, what, list(peers)]
        with self._lock:
            self._regions.append(region)
            self._lock.notify()
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, DistributedError) or not _is_transport_error(e):
                raise
            raise DistributedError(f"rank {self.rank}: lost the connection to {_rank_names(peers)} while "
                                   f"{what} ({e})") from None
        finally:
            with self._lock:
                self._regions.remove(region)
                self._lock.notify()

    def kick(self):
        with self._lock:
            if self._regions and self._regions[-1][0] != float("inf"):
                self._regions[-1][0] = time.monotonic() + self.timeout


class Ranks:
    """The process group, this rank's place in it, and its watchdog."""

    def __init__(self, group, timeout: Optional[float] = None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.watchdog = Watchdog(self.rank, timeout_seconds() if timeout is None else timeout)
        self.payload_bytes = 0  # bytes this rank has handed to send/all_sum in forward passes
        self.barrier = None  # a LocalBarrier when every rank runs on this machine (run_local_ranks)

    def sent(self, x: mx.array) -> mx.array:
        self.payload_bytes += x.nbytes
        return x

    @property
    def neighbours(self) -> List[int]:
        """The ranks a ring collective talks to directly (the ones a lost connection can be)."""
        return sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size} - {self.rank})

    def busy(self, what: str, peers: Optional[Sequence[int]] = None, idle: bool = False):
        return self.watchdog.busy(what, self.neighbours if peers is None else peers, idle)

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def wait_for_all(self, what: str) -> None:
        """Wait, asleep, until every rank gets here (when they share a LocalBarrier): a collective
        started then does not spin while a late rank computes."""
        if self.barrier is not None:
            with self.busy(what, [r for r in range(self.size) if r != self.rank]):
                self.barrier.wait()

    def broadcast(self, obj=None, idle: bool = False):
        """Rank 0's JSON-serialisable ``obj`` on every rank; ``idle``: the other ranks may wait
        for it without limit (a server between requests)."""
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        with self.busy("receiving a request from rank 0" if self.rank else "sending a request", None, idle):
            n = self.all_sum(mx.array([len(data)], dtype=mx.int32))
            mx.eval(n)
            n = int(n.item())
            if n == 0:
                return None if self.rank else obj
            buf = np.frombuffer(data, dtype=np.uint8) if self.rank == 0 else np.zeros(n, dtype=np.uint8)
            out = self.all_sum(mx.array(buf))  # the other ranks add zeros
            mx.eval(out)
        return json.loads(np.array(out).tobytes().decode())


    def stop_agreed(self, stop: bool = False) -> bool:
        """Whether rank 0 says ``stop`` (the other ranks' ``stop`` is ignored): called by every
        rank after each generated token, so that all of them end a generation at the same one."""
        with self.busy("agreeing whether to go on"):
            flag = self.all_sum(mx.array([1 if stop and self.rank == 0 else 0], dtype=mx.int32))
            mx.eval(flag)
        return bool(flag.item())


_WAIT_AT_START = r"""
import os, select, signal, sys
ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[1]))
if not ready:
    sys.stderr.write(sys.argv[3] + "\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[2]), signal.SIGTERM)
"""


def _hosts() -> List[str]:
    """The ring hostfile's address of each rank (for messages), or []."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        hosts = json.loads(Path(path).read_text()) if path else []
        return [",".join(h) if isinstance(h, list) else str(h) for h in hosts]
    except (OSError, ValueError):
        return []


_GROUPS: list = []


def leave(code: int) -> int:
    """End a process that joined the ranks with ``code``, skipping interpreter teardown: MLX's ring
    group, freed there while its threads still run, aborted the process now and then
    ("terminate called without an active exception") after a clean finish."""
    if not _GROUPS:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def init(timeout: Optional[float] = None) -> Ranks:
    """Join the ranks started by ``mlx.launch`` (``DistributedError`` when this process was not
    started by it); all ranks leave with the same random state."""
    timeout = timeout_seconds() if timeout is None else timeout
    if not mx.distributed.is_available():
        raise DistributedError("this MLX build has no distributed backend")
    rank = os.environ.get("MLX_RANK")
    hosts = _hosts()
    others = ", ".join(f"{i} ({h})" for i, h in enumerate(hosts) if str(i) != rank)
    if not hosts and os.environ.get("MLX_IBV_DEVICES"):  # JACCL: one entry per rank, no addresses
        try:
            count = len(json.loads(Path(os.environ["MLX_IBV_DEVICES"]).read_text()))
            others = ", ".join(str(i) for i in range(count) if str(i) != rank)
        except (OSError, ValueError, TypeError):
            pass
    message = (f"error: rank {rank}: rank(s) {others or '?'} did not connect within {timeout:g} s at start "
               f"({TIMEOUT_ENV} sets the limit)")
    # MLX holds the GIL while it connects, so the clock runs in another process.
    guard = subprocess.Popen([sys.executable, "-c", _WAIT_AT_START, str(timeout), str(os.getpid()), message],
                             stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise DistributedError(f"cannot join the other ranks: {e} (start every rank with mlx.launch)") from None
    finally:
        guard.stdin.close()
        guard.wait()
    ranks = Ranks(group, timeout)
    _GROUPS.append(group)
    if os.environ.get(BARRIER_ENV) and ranks.size > 1:
        ranks.barrier = LocalBarrier(os.environ[BARRIER_ENV], ranks.rank, ranks.size, timeout)
    if ranks.size > 1:
        seed = ranks.broadcast(int.from_bytes(os.urandom(4), "little"))
        mx.random.seed(seed)
    return ranks


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive ports of this machine that are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        held = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise DistributedError(f"no {n} consecutive free ports on 127.0.0.1")


class LocalBarrier:
    """A barrier of ranks on one machine, over sockets to rank 0, that waits asleep: MLX's ring
    collectives spin while a peer is late, taking the cores the late ranks compute on."""

    def __init__(self, address: str, rank: int, size: int, timeout: float):
        host, port = address.rsplit(":", 1)
        self.rank = rank
        if rank == 0:
            with socket.create_server((host, int(port))) as server:
                server.settimeout(timeout)
                try:
                    self.peers = [server.accept()[0] for _ in range(size - 1)]
                except socket.timeout:
                    raise DistributedError(f"rank 0: the other ranks did not reach the barrier at {address} "
                                           f"within {timeout:g} s") from None
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.peers = [socket.create_connection((host, int(port)), timeout=timeout)]
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise DistributedError(f"rank {rank}: cannot reach rank 0's barrier at {address}: "
                                               f"{e}") from None
                    time.sleep(0.05)
        for peer in self.peers:
            peer.settimeout(None)  # a wait is bounded by the rank's watchdog

    def wait(self) -> None:
        if self.rank == 0:
            for peer in self.peers:
                self._receive(peer)
            for peer in self.peers:
                peer.sendall(b"\1")
        else:
            self.peers[0].sendall(b"\1")
            self._receive(self.peers[0])

    def _receive(self, peer) -> None:
        if not peer.recv(1):
            raise DistributedError(f"rank {self.rank}: lost the connection to the barrier's other side")


def run_local_ranks(command: Sequence[str], n: int) -> int:
    """Run ``command`` as the ``n`` ranks of a ring on this machine (as ``mlx.launch --backend ring
    -n n`` would) that share a LocalBarrier, rank 0 with this process's output and the others' stdout
    discarded. Returns the first nonzero exit status (the other ranks are then stopped), else 0."""
    port = free_ports(n + 1)
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
        env = dict(os.environ, MLX_HOSTFILE=str(hostfile), **{BARRIER_ENV: f"127.0.0.1:{port + n}"})
        procs = [subprocess.Popen(list(command), env=dict(env, MLX_RANK=str(r)),
                                  stdout=None if r == 0 else subprocess.DEVNULL) for r in range(n)]
        try:
            while True:
                codes = [proc.poll() for proc in procs]
                failed = [code for code in codes if code not in (None, 0)]
                if failed:
                    return failed[0]
                if all(code == 0 for code in codes):
                    return 0
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait()


# -- splitting -------------------------------------------------------------------------------


def tensor_bytes(weights: Dict[str, mx.array]) -> tuple:
    """(bytes per decoder layer, bytes of the embedding, bytes of the head and its norms)."""
    per_layer: Dict[int, int] = {}
    embed = head = 0
    for name, v in weights.items():
        m = _LAYER_RE.match(name)
        if m:
            per_layer[int(m[1])] = per_layer.get(int(m[1]), 0) + v.nbytes
        elif name.startswith("embed."):
            embed += v.nbytes
        else:
            head += v.nbytes
    return [per_layer.get(i, 0) for i in range(max(per_layer, default=-1) + 1)], embed, head


# -- pipeline parallel ----------------------------------------------------------------------


class PipelineModel(Model):
    """The layers [first, end) of the decoder, plus the embedding on rank 0 and the head on the
    last rank. Called like Model on every rank, with the same tokens: every rank returns the
    full model's logits."""

    def __init__(self, args: ModelArgs, ranks: Ranks, first: int, end: int, dtype, stream_dtype):
        super().__init__(args)
        self.ranks = ranks
        self.first, self.end = first, end
        self._activation_dtype = dtype  # Model.dtype: the caches' dtype
        self.stream_dtype = stream_dtype  # the embedding's output: the hc streams and the logits
        self.layers = [None] * first + self.layers[first:end]
        last = ranks.rank == ranks.size - 1
        if ranks.rank != 0 and not (last and args.tie_word_embeddings):  # a tied head reads the embedding
            del self["embed"]
        if not last:
            for name in ("norm", "head", "hc_head_fn", "hc_head_base", "hc_head_scale"):
                self.pop(name, None)

    @property
    def dtype(self):
        return self._activation_dtype

    @property
    def own_layers(self):
        return self.layers[self.first:self.end]

    def make_cache(self, kv_dtype: str = "fp8", index_dtype: str = "fp4", naive: bool = False) -> ModelCache:
        """A cache for this rank's layers only."""
        ratios = self.args.compress_ratios[self.first:self.end]
        return layer_caches(self.args, ratios, kv_dtype, index_dtype, self.dtype, naive)

    def __call__(self, tokens: mx.array, cache: Optional[ModelCache] = None, last_only: bool = False,
                 return_hidden: bool = False):
        if return_hidden:
            raise DistributedError("the pipeline-parallel model does not return hidden states (MTP drafting)")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, length], got {tokens.shape}")
        if cache is None:
            cache = self.make_cache()
        a, ranks = self.args, self.ranks
        r, n = ranks.rank, ranks.size
        ranks.watchdog.kick()
        B, L = tokens.shape
        if r == 0:
            x = self.embed(tokens)
            h = expand(x, a.hc_mult)
        else:
            with ranks.busy(f"receiving hidden states from rank {r - 1}", [r - 1]):
                h = mx.distributed.recv((B, L, a.hc_mult, a.hidden_size), self.stream_dtype, r - 1, group=ranks.group)
                mx.eval(h)
        for layer, layer_cache in zip(self.own_layers, cache.layers):
            h = layer(h, tokens, layer_cache, cache.query_block)
        out_len = 1 if last_only else L
        if r < n - 1:
            with ranks.busy(f"sending hidden states to rank {r + 1}", [r + 1]):
                mx.eval(mx.distributed.send(ranks.sent(h), r + 1, group=ranks.group), cache.state())
            logits = mx.zeros((B, out_len, a.vocab_size), dtype=self.stream_dtype)
        else:
            if last_only:
                h = h[:, -1:]
            x = collapse(h, self, a)
            logits = split_outputs(self.head, self.norm(x)).astype(self.stream_dtype)
        return mx.distributed.all_sum(ranks.sent(logits), group=ranks.group) if n > 1 else logits


# -- expert parallel ------------------------------------------------------------------------


class ExpertParallelMoE(MoE):
    """MoE whose routed experts [start, start + count) are on this rank; every rank adds up
    the ranks' shares."""

    def __init__(self, args: ModelArgs, layer_id: int, ranks: Ranks, start: int, count: int):
        super().__init__(args, layer_id)
        self.experts = RoutedExperts(args.hidden_size, args.moe_intermediate_size, count, args.swiglu_limit)
        self.start, self.count = start, count
        self._ranks = ranks

    def __call__(self, x: mx.array, tokens: mx.array) -> mx.array:
        indices, weights = self.gate(x, tokens)
        local = indices - self.start
        mine = (local >= 0) & (local < self.count)
        # Other ranks' selections run through local expert 0 with weight 0: fixed shapes, no sync.
        y = self.experts(x, mx.where(mine, local, 0))
        weights = mx.where(mine, weights, 0.0)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        # all_gather + a sum in rank order: the same bits on every rank whatever the backend's
        # reduction order, and faster than all_sum for these small arrays over loopback
        # (benchmarks/distributed.py).
        shares = mx.distributed.all_gather(self._ranks.sent(y)[None], group=self._ranks.group)
        y = shares.sum(axis=0)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y


class ExpertParallelModel(Model):
    """Model with every MoE layer's routed experts split across the ranks."""

    def __init__(self, args: ModelArgs, ranks: Ranks):
        super().__init__(args)
        self.ranks = ranks
        start, end = expert_range(args.n_routed_experts, ranks.rank, ranks.size)
        self.expert_start, self.expert_end = start, end
        for i, layer in enumerate(self.layers):
            layer.ffn = ExpertParallelMoE(args, i, ranks, start, end - start)

    def __call__(self, tokens, cache=None, last_only=False, return_hidden=False):
        self.ranks.watchdog.kick()
        return super().__call__(tokens, cache, last_only, return_hidden)


# -- loading --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, mx.bfloat16),
                       "I32": (np.int32, None), "U32": (np.uint32, None), "U8": (np.uint8, None),
                       "I8": (np.int8, None), "I64": (np.int64, None), "U16": (np.uint16, None)}


def _safetensors_header(path: Path) -> tuple:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DistributedError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise DistributedError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


def read_rows(path: Path, name: str, start: int, end: int) -> mx.array:
    """Rows [start, end) (first axis) of tensor ``name`` in safetensors file ``path``, reading
    only their bytes."""
    header, data_start = _safetensors_header(path)
    info = header.get(name)
    if info is None:
        raise DistributedError(f"{path}: no tensor {name}")
    dtype, view = _SAFETENSORS_DTYPES.get(info["dtype"], (None, None))
    if dtype is None:
        raise DistributedError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be split by rows")
    shape = info["shape"]
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    begin = data_start + info["data_offsets"][0]
    if info["data_offsets"][1] - info["data_offsets"][0] != row * shape[0]:
        raise DistributedError(f"{path}: tensor {name}: byte range does not match shape {shape}")
    with open(path, "rb") as f:
        f.seek(begin + start * row)
        data = f.read((end - start) * row)
    if len(data) != (end - start) * row:
        raise DistributedError(f"{path}: tensor {name} is truncated at byte offset {begin + start * row + len(data)}")
    a = mx.array(np.frombuffer(data, dtype=dtype).reshape(end - start, *shape[1:]))
    return a.view(view) if view is not None else a


def _lazy_weights(path: Path) -> tuple:
    """(name -> lazily loaded array, name -> file) of the decoder (MTP tensors left out)."""
    from .loader import _weight_files, CheckpointError
    from .spec import is_mtp

    weights, files = {}, {}
    for f in _weight_files(path):
        try:
            loaded = mx.load(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
        for k, v in loaded.items():
            if not is_mtp(k):
                weights[k], files[k] = v, f
    return weights, files


def _embedding_dtypes(weights) -> tuple:
    """(Model.dtype, the embedding's output dtype), from the checkpoint's headers."""
    w = weights.get("embed.weight")
    if w is not None and mx.issubdtype(w.dtype, mx.floating):
        return w.dtype, w.dtype
    scales = weights.get("embed.scales")
    return mx.bfloat16, scales.dtype if scales is not None else mx.bfloat16


def load_distributed(path, ranks: Ranks, mode: str, split: Optional[str] = None) -> Model:
    """This rank's part of the checkpoint at ``path``, reading only its own tensors.

    mode "pipeline": layers split by their bytes (or ``split``, layer counts per rank such as
    "2,3,1"); mode "experts": routed experts split evenly."""
    from .loader import CheckpointError, _apply_quantization, _check_tensors, read_checkpoint_config, to_mlx_layout

    if mode not in MODES:
        raise DistributedError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
    path, config, args = read_checkpoint_config(path)
    weights, files = _lazy_weights(path)
    if mode == "pipeline":
        layer_bytes, embed_bytes, head_bytes = tensor_bytes(weights)
        if len(layer_bytes) != args.num_hidden_layers:
            layer_bytes = (layer_bytes + [0] * args.num_hidden_layers)[: args.num_hidden_layers]
        counts = (parse_split(split, args.num_hidden_layers, ranks.size) if split else
                  split_layers(layer_bytes, ranks.size,
                               *pipeline_extras(embed_bytes, head_bytes, args.tie_word_embeddings)))
        first = sum(counts[: ranks.rank])
        model = PipelineModel(args, ranks, first, first + counts[ranks.rank], *_embedding_dtypes(weights))
        model.layer_counts = counts
        keep = set(dict(tree_flatten(model.parameters())))
        mine = {}
        for k, v in weights.items():
            m = _LAYER_RE.match(k)
            if m and first <= int(m[1]) < first + counts[ranks.rank]:
                mine[k] = v
            elif not m and k.split(".")[0] in {n.split(".")[0] for n in keep}:
                mine[k] = v
        local_args = args
    else:
        model = ExpertParallelModel(args, ranks)
        start, end = model.expert_start, model.expert_end
        mine = {}
        for k, v in weights.items():
            m = _EXPERT_RE.match(k)
            if not m:
                mine[k] = v
            elif m[2] is not None:  # official layout: one tensor per expert, renumbered locally
                e = int(m[2])
                if start <= e < end:
                    mine[f"layers.{m[1]}.ffn.experts.{e - start}.{m[3]}.{m[4]}"] = v
            else:  # MLX layout: experts stacked on the first axis
                if v.shape[0] != args.n_routed_experts:
                    raise CheckpointError(f"{files[k]}: tensor {k} holds {v.shape[0]} experts, config.json "
                                          f"says {args.n_routed_experts}")
                mine[k] = read_rows(files[k], k, start, end)
        local_args = replace(args, n_routed_experts=end - start)
    if config.get("quantization"):
        _apply_quantization(model, config["quantization"])
    mine = to_mlx_layout(mine, local_args)
    _check_tensors(path, dict(tree_flatten(model.parameters())), mine)
    model.load_weights(list(mine.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model
