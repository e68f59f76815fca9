"""The two in-memory weight routes of SGLang's native API, both ends: the trainer's and the built-in server's.

update_weights_from_distributed: the trainer (rank 0) and every server rank form their own torch.distributed
group (`init_group`: NCCL on GPUs, gloo on CPU), apart from DeepSpeed's default group; the trainer announces
names/dtypes/shapes over HTTP and broadcasts each tensor from rank 0 while that request is in flight.
`init_group` meets SGLang's `init_custom_process_group` (sglang/srt/utils/common.py) on its own terms: a tcp://
rendezvous, the store prefixed with the group name and ranks registered 0..n-1 are what both sides must agree
on for our trainer to join a group with a real SGLang server (tested against SGLang 0.5.23 on the CPU).

The group is always a communicator of its own, never split from DeepSpeed's default group
(`_unbound_default_group`: with NCCL a split would hang, issue 24).

update_weights_from_tensor: `serialize_named_tensors` pickles [(name, tensor), ..] with torch's multiprocessing
reductions (what SGLang's MultiprocessingSerializer does): the pickle holds a handle to shared memory, not the
data. The trainer hands it CPU tensors (distributed.gathered_state_dict), so the handle names a /dev/shm file
("file_system" sharing strategy, which a process that did not fork from us can open) and the route needs room
there for two versions; CUDA tensors (only the GPU test sends them) would go as CUDA IPC handles. Either way it
only works for a server on the same machine. `load_named_tensors` is the
receiving side for the built-in server, with an allow-list unpickler (an HTTP body is untrusted input).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import os
import pickle
import socket
import threading

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions with ForkingPickler)
from multiprocessing.reduction import ForkingPickler

GROUP_NAME = "weight_update_group"   # SGLang's default group_name
DEFAULT_TIMEOUT_S = 600.0


def init_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
               group_name: str = GROUP_NAME, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join (rank 0: host) a process group that is not the default one; blocks until all ranks joined.

    tcp:// rendezvous (rank 0 runs the TCPStore), the store prefixed with the group name, a group that is not
    the default one (`_new_process_group_helper`), ranks registered as 0..world_size-1: the server's side."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    init_method = f"tcp://{_bracket(master_address)}:{master_port}"
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    with _unbound_default_group():
        pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                          backend_options=None, timeout=timeout, device_id=None)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


_unbind_lock = threading.Lock()


@contextlib.contextmanager
def _unbound_default_group():
    """Create a group as its own communicator, never split from the trainer's default group.

    DeepSpeed 0.19.8 passes device_id=cuda:LOCAL_RANK to init_process_group whenever the world size is not 1
    (deepspeed/comm/torch.py:276-281), which binds the default group to that device. torch 2.13 then builds
    every later group by ncclCommSplit of the default communicator (torch/distributed/distributed_c10d.py:2040-2041
    picks `split_from` when `_get_default_group().bound_device_id` is set; :2200-2201 hands it to
    ProcessGroupNCCL). ncclCommSplit is collective over the PARENT communicator: the other trainer ranks never
    call it and the servers do a plain ncclCommInitRank (SGLang calls init_process_group without device_id,
    sglang/srt/distributed/parallel_state.py init_distributed_environment), so both sides would wait forever.
    With no bound device id for the duration of the call, torch takes its non-split path (a fresh
    communicator whose unique id goes through this group's own store), what the server side expects. The
    default group's binding is restored at once; the lock keeps two creations in this process apart."""
    from torch.distributed.distributed_c10d import _get_default_group, is_initialized

    if not is_initialized():
        yield
        return
    default = _get_default_group()
    with _unbind_lock:
        bound = default.bound_device_id
        default.bound_device_id = None
        try:
            yield
        finally:
            default.bound_device_id = bound


def destroy_group(pg, *, abort: bool = False) -> None:
    """Release our end of a weight group. abort=True (NCCL, after a failed broadcast): cancel its pending ops
    first (torch/distributed/distributed_c10d.py:2460 `_abort_process_group`, NCCL only), so the watchdog does
    not find a stuck collective and tear rank 0 down (TORCH_NCCL_ASYNC_ERROR_HANDLING)."""
    if abort:
        try:
            from torch.distributed.distributed_c10d import _abort_process_group
            _abort_process_group(pg)
            return
        except Exception:   # no such API, or not NCCL: destroy below
            pass
    try:
        torch.distributed.destroy_process_group(pg)
    except Exception:   # already gone (the peer died): nothing to release
        pass


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_bindable(host: str, port: int) -> str | None:
    """None if this machine can listen on host:port (the TCPStore of the group), else why not."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as err:
        return f"cannot listen on {host}:{port} ({err.strerror or err})"
    return None


# ---- update_weights_from_tensor payloads -------------------------------------------------------------

def _reduce_cuda_by_uuid(tensor):
    """torch's CUDA reduction with the device uuid in place of its index (as SGLang's patch_torch does),
    so a server with another CUDA_VISIBLE_DEVICES finds the same GPU."""
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda and len(args) > 6 and isinstance(args[6], int):
        args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
    return fn, args


_manager_started = False


def _start_shm_manager_quietly():
    """torch's file_system sharing starts a `torch_shm_manager` daemon that inherits our stderr and lives as long
    as any process maps the shared files (the server does). A caller reading our stderr through a pipe
    (`topd-ds train 2>&1 | tee log`, subprocess.run(stderr=PIPE)) would then wait for EOF until the SERVER exits:
    start it once with stderr on /dev/null."""
    global _manager_started
    if _manager_started:
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        torch.zeros(1).share_memory_()     # the first file_system share spawns the manager
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    _manager_started = True


def serialize_named_tensors(named_tensors) -> str:
    """[(name, tensor), ..] -> base64 of the ForkingPickler bytes (a handle to shared memory, not the data).
    CPU tensors are moved to shared memory (one copy); the caller keeps them alive until the server answered."""
    torch.multiprocessing.set_sharing_strategy("file_system")   # a /dev/shm name any local process can open
    if any(not t.is_cuda for _, t in named_tensors):
        _start_shm_manager_quietly()
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table = dict(ForkingPickler._extra_reducers)  # copy: per pickler, not global
    if any(t.is_cuda for _, t in named_tensors):
        pickler.dispatch_table[torch.Tensor] = _reduce_cuda_by_uuid
        pickler.dispatch_table[torch.nn.Parameter] = _reduce_cuda_by_uuid
    pickler.dump([(str(n), t) for n, t in named_tensors])
    return base64.b64encode(buf.getvalue()).decode("ascii")


_ALLOWED = {
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "str"), ("builtins", "int"), ("builtins", "dict"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.nn.parameter", "Parameter"), ("torch._utils", "_rebuild_parameter"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Only the classes and rebuild functions a list of (name, CPU shared-memory tensor) needs, plus dtypes."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked global {module}.{name}")


def load_named_tensors(payload: str, where: str = "serialized_named_tensors[0]") -> list:
    """The receiving side (built-in server): base64 pickle -> [(name, tensor), ..]; ValueError naming `where`."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: not base64 ({err})") from None
    try:
        obj = _SafeUnpickler(io.BytesIO(raw)).load()
    except Exception as err:   # a blocked global, a torn pickle, a shared-memory file that is gone
        raise ValueError(f"{where}: cannot load the named tensors ({type(err).__name__}: {err})") from None
    if not isinstance(obj, list) or not all(
            isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], torch.Tensor)
            for e in obj):
        raise ValueError(f"{where}: expected a list of (name, tensor) pairs")
    return obj
