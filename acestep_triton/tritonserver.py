"""Run a real `tritonserver` from the `nvidia-pytriton` wheel, without the pytriton API.

The wheel carries the server binary (`pytriton/tritonserver/bin/tritonserver`), its
shared libraries (`nvidia_pytriton.libs/`), the python backend and one python-backend
stub per Python version. Triton expects the stub next to `libtriton_python.so`, so
`prepare_backend_directory` assembles `<dir>/python/` for the running Python, and
`TritonServer` points the binary at it with `--backend-directory`.

Python models run inside the stub's embedded interpreter. It runs isolated (PYTHONPATH is
ignored) and takes its prefix, hence its site-packages, from the first `python3` on the server's
PATH. So the server gets a stub environment (`stub_environment`) first on PATH: a virtual
environment of the server's Python (`python`, default this interpreter; on the GPU machine a
numpy-1 environment, see benchmarks/bench_triton.py) whose one `.pth` file puts this checkout
and that Python's site-packages on the path. Models then import torch and `acestep_triton`
wherever the server is started (it is started from `/`), and the environment they came from is
left untouched (several checkouts may share one). The running interpreter's libpython goes first
on LD_LIBRARY_PATH (the stub needs a libpython of its own version).
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STOP_GRACE_S = 20.0
# What the python backend prints when it aborts in the startup race that `TritonServer.start` retries.
STARTUP_RACE = "boost::interprocess::lock_exception"

log = logging.getLogger("acestep_triton.tritonserver")


class TritonServerError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class ServerInstall:
    """Where the pieces of the server live inside the installed `nvidia-pytriton` wheel."""

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(Path(p) for p in paths)


def locate_server() -> ServerInstall:
    """Find binary, libraries, python backend and the stub for this Python in the wheel."""
    for site_dir in _site_packages():
        root = site_dir / "pytriton" / "tritonserver"
        if root.is_dir():
            break
    else:
        raise TritonServerError(
            f"tritonserver not found: no pytriton/tritonserver in {[str(p) for p in _site_packages()]} "
            "(install nvidia-pytriton==0.7.0)"
        )
    install = ServerInstall(
        binary=root / "bin" / "tritonserver",
        libs_dir=site_dir / "nvidia_pytriton.libs",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub",
    )
    required = [install.binary, install.libs_dir, install.stub]
    required += [install.python_backend_dir / name for name in BACKEND_FILES]
    missing = [str(p) for p in required if not p.exists()]
    if missing:
        stubs = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"incomplete nvidia-pytriton install, missing: {missing} "
            f"(python-backend stubs present for {stubs}, running Python {PYTHON_VERSION})"
        )
    return install


def default_backend_cache() -> Path:
    """A per-venv cache: the assembled backend depends only on the wheel and the Python version."""
    return Path(sys.prefix) / "share" / "acestep-triton" / f"backends-py{PYTHON_VERSION}"


def _same_file(src: Path, dst: Path) -> bool:
    if not dst.is_file():
        return False
    s, d = src.stat(), dst.stat()
    return s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime)


def prepare_backend_directory(cache_dir: Path | None = None) -> Path:
    """Assemble `<cache_dir>/python/` = the wheel's python backend + the stub for this Python.

    Files are copied (not linked): the python backend looks for the stub beside its
    own library. Returns the directory to pass as `--backend-directory`; reused when
    the copies are up to date. Concurrent callers each build in a temporary sibling
    and rename it into place.
    """
    install = locate_server()
    backend_dir = Path(cache_dir) if cache_dir is not None else default_backend_cache()
    sources = [install.python_backend_dir / name for name in BACKEND_FILES] + [install.stub]
    target = backend_dir / "python"
    if all(_same_file(src, target / src.name) for src in sources):
        return backend_dir
    backend_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=backend_dir))
    for src in sources:
        shutil.copy2(src, staging / src.name)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not all(_same_file(src, target / src.name) for src in sources):
            raise
    return backend_dir


def _python_library_dir() -> Path | None:
    """Directory of this interpreter's shared libpython, when it was built with one."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    return libdir if (libdir / soname).is_file() else None


def _site_dirs(python: Path) -> list[str]:
    """purelib and platlib of the environment `python` belongs to."""
    code = "import sysconfig, json; p = sysconfig.get_paths(); print(json.dumps(sorted({p['purelib'], p['platlib']})))"
    result = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, cwd="/")
    if result.returncode != 0:
        raise TritonServerError(f"cannot run {python}: {result.stderr.strip()[-500:]}")
    return list(json.loads(result.stdout))


def stub_environment(python: Path, root: Path | None = None) -> Path:
    """The environment the python-backend stubs run in: returns its `bin/` directory.

    A virtual environment made by `python` (so of its version) under `root` (default
    build/stub-env/<name> of this checkout), whose site-packages holds `acestep-triton.pth`: this
    checkout first, then `python`'s own site-packages (with their .pth files). Rebuilt when the
    file is not what it should be; checked by importing nothing but locating `acestep_triton`
    in isolated mode from `/`, as the stub will.
    """
    python = Path(python).absolute()
    if root is None:
        tag = hashlib.sha256(str(python).encode()).hexdigest()[:12]
        root = REPO_ROOT / "build" / "stub-env" / f"{python.parent.parent.name.lstrip('.')}-{tag}"
    root = Path(root)
    pth_lines = [str(REPO_ROOT)] + [f"import site; site.addsitedir({d!r})" for d in _site_dirs(python)]
    stub_python = root / "bin" / "python3"
    if not stub_python.exists():
        subprocess.run([str(python), "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    site_dirs = _site_dirs(stub_python)
    pth = Path(site_dirs[0]) / "acestep-triton.pth"
    text = "\n".join(pth_lines) + "\n"
    if not pth.is_file() or pth.read_text() != text:
        pth.write_text(text)
    code = "import importlib.util as u; print(u.find_spec('acestep_triton').origin)"
    found = subprocess.run([str(stub_python), "-I", "-c", code], capture_output=True, text=True, cwd="/")
    if found.returncode != 0 or not Path(found.stdout.strip()).is_relative_to(REPO_ROOT):
        raise TritonServerError(f"the stub environment {root} does not import acestep_triton from {REPO_ROOT}: "
                                f"{(found.stdout + found.stderr).strip()[-500:]}")
    return stub_python.parent


def server_environment(
    install: ServerInstall, stub_bin: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for the server: its libraries, this interpreter's libpython, and the stub
    environment's `python3` first on PATH (see `stub_environment`)."""
    env = dict(os.environ if base is None else base)
    lib_dirs = [install.libs_dir]
    python_lib = _python_library_dir()
    if python_lib is not None:
        lib_dirs.insert(0, python_lib)
    elif ctypes.util.find_library(f"python{PYTHON_VERSION}") is None:
        raise TritonServerError(
            f"the python backend stub needs libpython{PYTHON_VERSION}.so.1.0: install it "
            f"(Debian: libpython{PYTHON_VERSION}) or use a Python built with --enable-shared"
        )
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(p) for p in lib_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    )
    env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", "")])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def process_group_pids(pgid: int) -> list[int]:
    """Live pids in process group `pgid` (the server and the stubs it spawned)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


class TritonServer:
    """One `tritonserver` process serving `model_repository`; a context manager.

    Ports left at 0 are picked free on `host`. Server stdout+stderr go to
    `log_path` (a temporary file unless given). The python models run in `stub_environment(python)`
    (`python`: the interpreter whose packages they import, default this one). `extra_args` go to
    the command line after ours (benchmarks/bench_triton.py sizes the CUDA memory pool with them).
    `start()` returns once `/v2/health/ready` answers 200, or raises TritonServerError with the log
    tail and the names of models that failed to load.
    """

    def __init__(
        self,
        model_repository: Path | Sequence[Path],
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
        log_verbose: int = 0,
        startup_timeout_s: float = 120.0,
        stop_grace_s: float = STOP_GRACE_S,
        backend_dir: Path | None = None,
        python: Path | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        repos = [model_repository] if isinstance(model_repository, (str, Path)) else list(model_repository)
        self.model_repositories = [Path(r).resolve() for r in repos]
        for repo in self.model_repositories:
            if not repo.is_dir():
                raise TritonServerError(f"model repository {repo} is not a directory")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.backend_dir = backend_dir
        self.python = Path(python) if python is not None else Path(sys.executable)
        self.extra_env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """`host:port` as tritonclient.http expects it."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """`host:port` as tritonclient.grpc expects it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, install: ServerInstall, backend_dir: Path) -> list[str]:
        """The tritonserver command line."""
        cmd = [str(install.binary)]
        cmd += [f"--model-repository={repo}" for repo in self.model_repositories]
        cmd += [
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        return cmd + list(self.extra_args)

    def start(self) -> None:
        """Launch the server and block until it is ready (or raise with the log tail).

        The 0.7.0 python backend sometimes aborts at startup while many stubs initialise at once
        (`boost::interprocess::lock_exception` on its shared-memory mutex, then SIGABRT; seen once
        in ~30 CPU server starts of the test suite). That crash is retried once; any other failure,
        or the same one twice, is raised.
        """
        try:
            self._start_once()
        except TritonServerError as exc:
            if STARTUP_RACE not in str(exc):
                raise
            log.warning("tritonserver aborted at startup (%s); starting it again", STARTUP_RACE)
            self._start_once()

    def _start_once(self) -> None:
        if self.process is not None:
            raise TritonServerError("server already started")
        install = locate_server()
        backend_dir = prepare_backend_directory(self.backend_dir).resolve()
        env = server_environment(install, stub_environment(self.python))
        env.update(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(install, backend_dir),
                cwd="/",  # nothing may depend on where the server was started
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def is_ready(self) -> bool:
        """True when `/v2/health/ready` answers 200."""
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Poll readiness; fail fast if the process exits, with the log tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None:
                raise TritonServerError("server not started")
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(self._failure(f"tritonserver exited with code {code} during startup"))
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonServerError(self._failure(f"tritonserver not ready after {timeout_s:.0f} s"))

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failed_models(self) -> list[str]:
        """Names of models the log reports as failed to load, in order of first mention."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        names = re.findall(r"failed to load '([^']+)'", text)
        names += re.findall(r"^\|\s*(\S+)\s*\|\s*\S+\s*\|\s*UNAVAILABLE", text, flags=re.MULTILINE)
        return list(dict.fromkeys(names))

    def error_lines(self) -> list[str]:
        """The log's error-level lines (Triton prefixes them `E<MMDD>`), escaped newlines expanded."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line.replace("\\n", "\n") for line in text.splitlines() if re.match(r"E\d{4} ", line)]

    def _failure(self, headline: str) -> str:
        failed = self.failed_models()
        models = f"; models failed to load: {', '.join(failed)}" if failed else ""
        errors = "\n".join(self.error_lines())
        return f"{headline}{models}\nerrors:\n{errors}\nlog {self.log_path} (tail):\n{self.log_tail(15)}"

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL its process group after `stop_grace_s`; idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        pgid = process.pid
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        deadline = time.monotonic() + 5.0
        while process_group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_group_pids(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run tritonserver in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.tritonserver", description=main.__doc__)
    parser.add_argument("--model-repository", type=Path, required=True, action="append")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8010)
    parser.add_argument("--grpc-port", type=int, default=8011)
    parser.add_argument("--metrics-port", type=int, default=8012)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--python", type=Path, default=None,
                        help="interpreter whose packages the python models import (default: this one)")
    args = parser.parse_args(argv)
    server = TritonServer(
        args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_path=args.log_file,
        log_verbose=args.log_verbose,
        startup_timeout_s=args.startup_timeout,
        python=args.python,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
        print(f"tritonserver ready: http {server.http_url} grpc {server.grpc_url} metrics {server.metrics_url}")
        print(f"log: {server.log_path}", flush=True)
        assert server.process is not None
        code = server.process.wait()
        print(f"tritonserver exited with code {code}\n{server.log_tail()}", file=sys.stderr)
        return code
    except TritonServerError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
