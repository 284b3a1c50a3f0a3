"""Loading a model in a child process, so that a serving process keeps decoding meanwhile.

Reading a checkpoint and merging a LoRA adapter is mostly Python: on a background thread of
the inference worker it holds the GIL for long stretches and competes for the same cores, and
the answers in flight stall (bench/retrain.py measured single gaps of ~300 ms on ``small``).
In a child process at the lowest CPU priority it gets only what decoding leaves, and holds
no lock of the worker's. The weights come back through shared memory (torch.multiprocessing
passes tensor storages as file descriptors, no copy); what is left for the worker is the
cheap part: optimising the loaded model for decoding (``build_chatbot(..., loaded=...)``).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.multiprocessing as mp

from inference.chatbot import LoadedModel, load_model
from inference.config import PipelineConfig
from inference.errors import ModelLoadError

log = logging.getLogger(__name__)


class ChildLoadFailed(RuntimeError):
    """The child process could not hand a model over (it died, or shared memory ran out)."""


def load_in_child(config: PipelineConfig, timeout_s: float = 3600) -> LoadedModel:
    """``load_model(config)`` run in a child process at background priority; the weights are
    shared.

    Raises ``ModelLoadError`` when the model itself cannot be loaded, and ``ChildLoadFailed``
    when the child could not deliver it (the caller may then load in-process).
    """
    ctx = mp.get_context("spawn")  # fork would copy the worker's threads and OpenMP state
    receiver, sender = ctx.Pipe(duplex=False)
    done = ctx.Event()
    child = ctx.Process(
        target=_load_and_send, args=(config, sender, done), name="sprbot-model-loader"
    )
    child.daemon = True
    child.start()
    sender.close()
    try:
        waited = 0.0
        while not receiver.poll(1.0):
            waited += 1.0
            if not child.is_alive():
                raise ChildLoadFailed(f"the loader process exited with code {child.exitcode}")
            if waited >= timeout_s:
                raise ChildLoadFailed(f"the loader process took longer than {timeout_s:.0f}s")
        try:
            status, payload = receiver.recv()  # rebuilds the shared tensors
        except (EOFError, OSError) as exc:
            raise ChildLoadFailed(f"the loader process died while sending: {exc}") from None
    finally:
        done.set()  # the child keeps its end of the shared memory open until now
        receiver.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    if status == "loaded":
        return payload
    if status == "bad model":
        raise ModelLoadError(payload)
    raise ChildLoadFailed(payload)


# Nice 19 starved a load for minutes while decoding kept every core busy (a hot swap under
# sustained load never came). At nice 10 CFS still gives it about a tenth of the CPU a decoding
# thread gets (weight 110 against 1024), so a swap waits for seconds, not for a quiet moment.
LOADER_NICE = 10


def background_priority() -> None:
    """Run the calling thread, and the threads it starts, at ``LOADER_NICE`` in the batch class:
    the scheduler does not preempt decoding to run it. (On Linux both are per thread.)

    Not SCHED_IDLE: the worker's loader thread waits on this process for every tensor it
    receives, and an idle-class sender, starved by decoding, held the worker's GIL for most
    of a second (measured: 0.8 s token gaps).
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux: nice alone
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, 0, max(LOADER_NICE, os.getpriority(os.PRIO_PROCESS, 0)))


def _load_and_send(config: PipelineConfig, sender, done) -> None:
    background_priority()
    # One core's worth at most: decoding is bound by memory bandwidth, which a loader on
    # every core would take from it even at low priority.
    torch.set_num_threads(1)
    try:
        loaded = load_model(config)
    except ModelLoadError as exc:
        sender.send(("bad model", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        sender.send(("bad model", f"cannot load {config.model_name_or_path}: {exc}"))
    else:
        try:
            sender.send(("loaded", loaded))  # moves every storage to shared memory
        except BrokenPipeError:
            return  # the worker stopped meanwhile: nobody is waiting for this model
        except Exception as exc:  # noqa: BLE001 - e.g. /dev/shm too small
            sender.send(("failed", f"cannot share the loaded model: {type(exc).__name__}: {exc}"))
    sender.close()
    done.wait(600)
