"""The ``tritonserver`` that cvt-serve runs: PyTriton's binary and Python-backend stub, our model.

PyTriton (the ``serve`` extra) ships a ``tritonserver`` binary with the Python backend and a
stub per Python version. cvt-serve writes a model repository of one Python-backend model
(serve/backend.py: the runtime runs in the stub and answers each request of a batch on its
own) into a private folder, with a backend folder pointing at PyTriton's files, and runs
``tritonserver`` on it as a child in a process group of its own, so that stopping it stops its
stubs too. PyTriton's own model proxy is not used: it can only fail a batch as a whole.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import CvtDeployError
from .backend import PARAMETER
from .protocol import CLASSES, IMAGES, LABELS, LOGITS, PIXELS, SCORES

if TYPE_CHECKING:
    from ..config import CvtConfig
    from .options import ServeOptions

READY_TIMEOUT_S = 300  # loading a big bundle on a busy machine
STOP_TIMEOUT_S = 10


def distribution() -> tuple[Path, Path, Path, Path]:
    """(tritonserver binary, PyTriton's Python-backend folder, the stub for this Python, the
    libraries they link) from the installed PyTriton; a clear error where one is missing."""
    import pytriton

    root = Path(pytriton.__file__).resolve().parent
    server = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = (server / "bin" / "tritonserver", server / "backends" / "python",
             server / "python_backend_stubs" / version / "triton_python_backend_stub", root.parent / "nvidia_pytriton.libs")
    missing = [p for p in found if not p.exists()]
    if missing:
        raise CvtDeployError(f"the installed PyTriton has no {missing[0].name} for Python {version} ({missing[0]})",
                             "reinstall the serve extra: pip install --force-reinstall 'cvt-deploy[serve]' (PyTriton "
                             "ships Triton for Linux x86-64 and Python 3.8-3.13)")
    return found


def model_config(options: ServeOptions, config: CvtConfig, max_batch: int, how: dict[str, Any]) -> str:
    """config.pbtxt of the served model, checked with Triton's own schema."""
    from .repository import quoted, validate_config

    k = min(options.topk, config.num_classes)
    c, h, w = config.in_chans, config.img_size, config.img_size
    text = "\n".join([
        f"name: {quoted(options.model_name)}", 'backend: "python"', f"max_batch_size: {max_batch}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
        "input [",
        f"  {{ name: {quoted(IMAGES)} data_type: TYPE_STRING dims: [ 1 ] optional: true }},",
        f"  {{ name: {quoted(PIXELS)} data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] optional: true }}",
        "]",
        "output [",
        f"  {{ name: {quoted(LOGITS)} data_type: TYPE_FP32 dims: [ {config.num_classes} ] }},",
        f"  {{ name: {quoted(CLASSES)} data_type: TYPE_INT64 dims: [ {k} ] }},",
        f"  {{ name: {quoted(SCORES)} data_type: TYPE_FP32 dims: [ {k} ] }},",
        f"  {{ name: {quoted(LABELS)} data_type: TYPE_STRING dims: [ {k} ] }}",
        "]",
        f"instance_group [ {{ kind: KIND_CPU count: {options.instances} }} ]",
        f"parameters {{ key: {quoted(PARAMETER)} value: {{ string_value: {quoted(json.dumps(how))} }} }}",
    ]) + "\n"
    validate_config(text, "cvt-serve model config")
    return text


class TritonProcess:
    """``tritonserver`` serving one Python-backend model from a private folder: :meth:`start`
    returns once the model is ready, :meth:`stop` ends the process group (Triton and its stubs)."""

    def __init__(self, options: ServeOptions, config_text: str, log_file: str | os.PathLike[str] | None) -> None:
        self.options = options
        self.config_text = config_text
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.folder: Path | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        binary, backend, stub, libs = distribution()
        self.folder = Path(tempfile.mkdtemp(prefix="cvt-serve-triton-"))
        backends = self.folder / "backends" / "python"
        backends.mkdir(parents=True)
        for src in (*backend.iterdir(), stub):
            if src.is_file():
                (backends / src.name).symlink_to(src)
        model = self.folder / "models" / self.options.model_name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(self.config_text)
        # Where this cvt_deploy is, so that the stub imports this one whatever its own sys.path holds.
        package_root = Path(__file__).resolve().parents[2]
        (model / "1" / "model.py").write_text(
            f"import sys\nsys.path.insert(0, {str(package_root)!r})\n"
            "from cvt_deploy.serve.backend import TritonPythonModel  # noqa: E402,F401\n")
        o = self.options
        cmd = [str(binary), f"--model-repository={self.folder / 'models'}",
               f"--backend-directory={self.folder / 'backends'}", f"--http-address={o.host}",
               f"--http-port={o.http_port}", f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
               f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}", "--allow-gpu-metrics=false",
               f"--exit-timeout-secs={STOP_TIMEOUT_S // 2}", "--disable-auto-complete-config"]
        if self.log_file is not None:
            self._log = open(self.log_file, "ab")  # noqa: SIM115 (open while Triton runs)
        self.proc = subprocess.Popen(cmd, env=_environment(libs), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        o = self.options
        host = "127.0.0.1" if o.host in ("0.0.0.0", "") else o.host
        url = f"http://{host}:{o.http_port}/v2/models/{o.model_name}/ready"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise CvtDeployError("Triton stopped while loading the model", self.log_hint())
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise CvtDeployError(f"the model was not ready after {READY_TIMEOUT_S} s", self.log_hint())

    def log_hint(self) -> str:
        return f"see Triton's log in {self.log_file}" if self.log_file else "see Triton's log above"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to Triton (it unloads the model, ending the stubs), then SIGKILL to the whole
        process group if anything of it is still there after :data:`STOP_TIMEOUT_S`."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stubs Triton left behind, or Triton itself
            except ProcessLookupError:
                pass
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _environment(libs: Path) -> dict[str, str]:
    """Triton's environment: the libraries PyTriton ships, and this interpreter's own libpython
    first. The stub links libpython dynamically; on a Python built outside the system (pyenv,
    conda) it would otherwise load the system's libpython of the same version and fail at model
    load (``'_thread.RLock' object has no attribute '_recursion_count'``). Its PATH starts with
    this interpreter's folder, so the stub's Python is this environment's."""
    env = os.environ.copy()
    paths = [p for p in (sysconfig.get_config_var("LIBDIR"), str(libs)) if p and Path(p).is_dir()]
    current = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = ":".join([*paths, *([current] if current else [])])
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
