"""A local tritonserver from the nvidia-pytriton wheel, for tests, benchmarks and
`sparsevlm-triton serve REPO`.

`LocalTritonServer` starts the server on 127.0.0.1 with free ports, waits until it is ready,
and stops it cleanly (process group, Python-backend stubs, /dev/shm regions), following the
recipe and gotchas in docs/triton-cpu.md. It serves any repository; those of
`repository.py` are the ones it is tested with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import RepoError


@dataclass
class PytritonServer:
    env: Path            # the environment holding nvidia-pytriton (numpy<2)
    python: Path         # its interpreter
    binary: Path         # .../pytriton/tritonserver/bin/tritonserver
    backends: Path       # .../pytriton/tritonserver/backends
    stub: Path           # python_backend_stubs/<major.minor>/triton_python_backend_stub
    libs: Path           # site-packages/nvidia_pytriton.libs
    libdir: str          # the base interpreter's LIBDIR (the right libpython)


def default_server_env() -> Path | None:
    """$SPARSEVLM_TRITON_ENV, else <checkout>/build/triton-env, else this interpreter's env."""
    if os.environ.get("SPARSEVLM_TRITON_ENV"):
        return Path(os.environ["SPARSEVLM_TRITON_ENV"])
    checkout = Path(__file__).resolve().parents[2] / "build" / "triton-env"  # <checkout>/runtime/triton/
    if checkout.exists():
        return checkout
    return Path(sys.prefix)


def find_server(env: str | Path | None = None) -> PytritonServer:
    """Locate the nvidia-pytriton tritonserver in `env` (a venv). Raises RepoError saying what
    to install when it is not there."""
    env = Path(env) if env is not None else default_server_env()
    python = env / "bin" / "python"
    if not python.exists():
        raise RepoError(f"triton env: {env} has no bin/python; create it: python -m venv {env} && "
                        f"{env}/bin/pip install 'nvidia-pytriton==0.7.0' 'numpy<2'")
    probe = ("import sys, sysconfig, json, importlib.util as u, numpy\n"
             "s = u.find_spec('pytriton')\n"
             "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'),"
             " 'pytriton': None if s is None else list(s.submodule_search_locations)[0], 'numpy': numpy.__version__}))")
    try:
        found = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True,
                                          timeout=60, env=_clean_env()).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError) as error:
        raise RepoError(f"triton env: {python} cannot import numpy/pytriton ({error}); install "
                        "'nvidia-pytriton==0.7.0' 'numpy<2' there") from None
    if found["pytriton"] is None:
        raise RepoError(f"triton env: nvidia-pytriton is not installed in {env}: {env}/bin/pip install 'nvidia-pytriton==0.7.0'")
    if int(found["numpy"].split(".")[0]) >= 2:
        raise RepoError(f"triton env: {env} has numpy {found['numpy']}; the Python backend stub needs numpy<2 "
                        "(with numpy 2 every output tensor comes back empty)")
    root = Path(found["pytriton"]) / "tritonserver"
    server = PytritonServer(env, python, root / "bin" / "tritonserver", root / "backends",
                            root / "python_backend_stubs" / found["version"] / "triton_python_backend_stub",
                            Path(found["pytriton"]).parent / "nvidia_pytriton.libs", found["libdir"])
    for path in (server.binary, server.backends / "python" / "libtriton_python.so", server.stub):
        if not path.exists():
            raise RepoError(f"triton env: {path} is missing (nvidia-pytriton install incomplete?)")
    return server


def _clean_env() -> dict:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    return env


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


class LocalTritonServer:
    """The nvidia-pytriton tritonserver on 127.0.0.1 with free ports, as a context manager.

    Applies the recipe of docs/triton-cpu.md: a private backend
    directory with a copy of the stub, LD_LIBRARY_PATH = LIBDIR + nvidia_pytriton.libs, the
    stub environment's bin/ first on PATH, a unique shm-region prefix, readiness polled with
    a timeout (a broken stub hangs rather than exiting), SIGTERM then SIGKILL of the whole
    process group, and removal of the shm regions. After `stop()`, `leftover_pids` and
    `leftover_shm` say what (if anything) survived."""

    def __init__(self, repo: str | Path, env: str | Path | None = None, log: str | Path | None = None,
                 ready_timeout: float = 120.0, extra_args: list[str] | None = None,
                 ports: tuple[int, int, int] | None = None):
        self.repo = Path(repo).resolve()
        self.server = find_server(env)
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args or [])
        self.workdir = Path(tempfile.mkdtemp(prefix="sparsevlm-triton-"))
        self.log_path = Path(log) if log else self.workdir / "tritonserver.log"
        self.shm_prefix = f"svlm_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.http_port, self.grpc_port, self.metrics_port = ports or free_ports(3)
        self.proc: subprocess.Popen | None = None
        self.leftover_pids: list[int] = []
        self.leftover_shm: list[str] = []
        self.startup_seconds = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [str(self.server.binary), f"--model-repository={self.repo}",
                f"--backend-directory={self.workdir / 'backends'}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--disable-auto-complete-config",
                "--exit-timeout-secs=30", f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--backend-config=python,stub-timeout-seconds=300",
                *self.extra_args]

    def environment(self) -> dict:
        env = _clean_env()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [self.server.libdir, str(self.server.libs),
                                                             env.get("LD_LIBRARY_PATH", "")] if p)
        env["PATH"] = f"{self.server.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _prepare_backends(self) -> None:
        python = self.workdir / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            os.symlink(self.server.backends / "python" / name, python / name)
        shutil.copy2(self.server.stub, python / "triton_python_backend_stub")

    def start(self) -> "LocalTritonServer":
        import urllib.error
        import urllib.request

        self._prepare_backends()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                     start_new_session=True, cwd=self.workdir)
        log.close()
        deadline = t0 + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                causes, tail = self.load_failures(), self.log_tail()
                self.stop()
                if causes:  # the models' own errors, not the server's table of options
                    raise RepoError(f"tritonserver could not load {'; '.join(causes)} (full log: {self.log_path})")
                raise RepoError(f"tritonserver exited with {self.proc.returncode} before ready; log tail:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RepoError(f"tritonserver not ready after {self.ready_timeout:.0f} s; log tail:\n{tail}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - t0
        return self

    def load_failures(self) -> list[str]:
        """One line per model that failed to load, from the server log: "model 'NAME': cause"
        (the first line of the Python error, without the stub's traceback)."""
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        causes = {}
        for name, cause in re.findall(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"\s*$)", log, re.M):
            causes.setdefault(name, cause.removeprefix("Internal: ").strip())
        return [f"model '{name}': {cause}" for name, cause in causes.items()]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def inference_counts(self, settle_seconds: float = 30.0) -> dict[str, tuple[int, int]]:
        """{model: (inference_count, execution_count)} from the server's statistics, once settled.

        Triton records a request's statistics after its response has gone out, so right after
        the clients return the last few requests may not be counted yet (CI once read 197 of
        200). Read until two reads 0.5 s apart agree; with no request in flight that takes one
        round."""
        import tritonclient.http as httpclient

        http = httpclient.InferenceServerClient(self.http_url)

        def read():
            return {s["name"]: (int(s["inference_count"]), int(s["execution_count"]))
                    for s in http.get_inference_statistics()["model_stats"]}

        try:
            deadline = time.monotonic() + settle_seconds
            previous = read()
            while time.monotonic() < deadline:
                time.sleep(0.5)
                current = read()
                if current == previous:
                    return current
                previous = current
            return previous
        finally:
            http.close()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group; the stubs are in it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while _pids_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.leftover_pids = _pids_in_group(pgid)
        for pid in self.leftover_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shm = Path("/dev/shm")
        self.leftover_shm = sorted(p.name for p in shm.glob(f"{self.shm_prefix}*")) if shm.exists() else []
        for name in self.leftover_shm:
            try:
                (shm / name).unlink()
            except OSError:
                pass
        shutil.rmtree(self.workdir / "backends", ignore_errors=True)

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
