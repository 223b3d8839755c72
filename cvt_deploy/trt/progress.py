"""What a TensorRT build shows while it runs: the builder's phases (TensorRT >= 10's progress
monitor, which also lets Ctrl-C stop the build) or, where there is none (8.x), a heartbeat."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import tensorrt


def attach_progress(trt: Any, config: tensorrt.IBuilderConfig, cancel: threading.Event) -> bool:
    """Print the build phases via the progress API of ``trt`` (the tensorrt or tensorrt_rtx module;
    TensorRT >= 10); False where there is none.

    Ctrl-C inside a callback sets ``cancel``, and the next step_complete asks TensorRT to stop.
    """
    if not hasattr(trt, "IProgressMonitor"):
        return False

    class Monitor(trt.IProgressMonitor):
        """Prints the top two levels of build phases with the elapsed time."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # the pybind11 trampoline needs the explicit call
            self.start = time.perf_counter()
            self.depth: dict[str, int] = {}
            self.lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self.lock:
                    depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                    self.depth[phase_name] = depth
                if depth <= 1:
                    print(f"  {'  ' * depth}{phase_name} ({num_steps} step{'s' * (num_steps != 1)}) "
                          f"[{time.perf_counter() - self.start:.0f}s]", file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                cancel.set()

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return not cancel.is_set()
            except KeyboardInterrupt:
                cancel.set()
                return False

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self.lock:
                    self.depth.pop(phase_name, None)
            except KeyboardInterrupt:
                cancel.set()

    config.progress_monitor = Monitor()  # TensorRT keeps it referenced for the config's lifetime
    return True


@contextlib.contextmanager
def heartbeat(show: bool, every: float = 15.0) -> Iterator[None]:
    """Where TensorRT has no progress API (8.6): an elapsed-time line every ``every`` seconds."""
    if not show:
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            print(f"  still building ... {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, name="trt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
