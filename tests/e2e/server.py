"""A headless ComfyUI server for tests (comfyui-dev.md §4), with this pack and a temporary base directory.

``start_comfy_server()`` makes ``<base>/{custom_nodes,models/checkpoints,input,output,user,temp}``, links this
repo as ``<base>/custom_nodes/conceptlab`` (``--base-directory`` moves every user folder there, so the user's own
ComfyUI folders are never touched), starts ``python main.py --cpu --listen 127.0.0.1 --port <free>`` from
COMFYUI_PATH with an in-memory database, and waits for ``GET /object_info``. ``ComfyServer.run(prompt)`` POSTs an
API-format workflow to ``/prompt`` and polls ``/history/<id>`` until ``execution_success`` (or raises with
ComfyUI's error). Stop it with ``stop()`` (its PID only). Only the standard library is used.

Pytest fixtures live in :mod:`e2e.fixtures`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt or its execution failed; the message carries ComfyUI's error text."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A running ComfyUI process. Attributes: ``base`` (its base directory), ``port``, ``url``, ``log``."""

    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path, own_base: bool):
        self.base, self.port, self.proc, self.log, self._own_base = base, port, proc, log, own_base
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex

    # -- folders ------------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.base / "models" / "checkpoints"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def add_model(self, folder: str, path: Path, name: str | None = None) -> str:
        """Link ``path`` into ``<base>/models/<folder>/`` (no copy); returns the name ComfyUI lists."""
        dest_dir = self.base / "models" / folder
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / (name or Path(path).name)
        if not dest.exists():
            os.symlink(Path(path).resolve(), dest)
        return dest.name

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, route: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {route} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from e
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        """POST an API-format workflow; returns its prompt_id. ``ComfyError`` with node errors if refused."""
        res = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if res.get("node_errors"):
            raise ComfyError(f"prompt refused: {json.dumps(res['node_errors'])[:4000]}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns the history entry (``outputs``, ``status``).

        Raises ``ComfyError`` with ComfyUI's exception text on ``execution_error`` / interruption, ``TimeoutError``
        after ``timeout`` seconds, ``RuntimeError`` if the server died (last log lines attached).
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            hist = self.get(f"/history/{prompt_id}")
            entry = (hist or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                msgs = {m[0]: m[1] for m in status.get("messages", [])}
                if "execution_success" in msgs and status.get("status_str") == "success":
                    return entry
                err = msgs.get("execution_error") or msgs.get("execution_interrupted") or status
                raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(err)[:4000]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt`` and wait for it (see :meth:`wait`)."""
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict, kind: str = "images") -> list[Path]:
        """Files a finished prompt wrote (``outputs.<node>.<kind>`` with filename/subfolder/type)."""
        files = []
        for out in entry.get("outputs", {}).values():
            for f in out.get(kind, []):
                root = {"output": self.output_dir, "input": self.input_dir, "temp": self.base / "temp"}[f["type"]]
                files.append(root / f.get("subfolder", "") / f["filename"])
        return files

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def import_failures(self) -> list[str]:
        """``IMPORT FAILED`` lines of the startup log that concern this pack (not ComfyUI's optional nodes)."""
        return [ln for ln in self.log.read_text(errors="replace").splitlines()
                if "IMPORT FAILED" in ln and "conceptlab" in ln]

    def stop(self, timeout: float = 20) -> None:
        """Stop the server process (by its PID) and remove a base directory this object created."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: ask the kernel to SIGTERM the server if the test process dies (no orphaned servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - best effort, other platforms
        pass


_RUNNING: list[ComfyServer] = []


@atexit.register
def _stop_all() -> None:
    for srv in list(_RUNNING):  # noqa: PERF101 - stop() removes from _RUNNING
        srv.stop()


def start_comfy_server(base: str | os.PathLike | None = None, *, comfyui: str | os.PathLike | None = None,
                       python: str | None = None, extra_args: tuple[str, ...] = (), timeout: float = 300,
                       pack_name: str = "conceptlab") -> ComfyServer:
    """Start ComfyUI ``--cpu`` on a free 127.0.0.1 port with this repo linked into ``<base>/custom_nodes``.

    ``base``: a base directory (default: a new temp dir, removed by ``stop()``); ``comfyui``: the checkout
    (default COMFYUI_PATH); ``python``: interpreter (default this one). Raises ``RuntimeError`` with the log tail
    if the server exits or does not answer ``/object_info`` within ``timeout`` seconds.
    """
    root = Path(comfyui or os.environ.get("COMFYUI_PATH", "")).resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI checkout at {root} (set COMFYUI_PATH)")
    own = base is None
    base = Path(tempfile.mkdtemp(prefix="conceptlab-comfy-")) if own else Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_name
    if not link.exists():
        os.symlink(REPO, link)
    port = free_port()
    log = base / "comfyui.log"
    cmd = [python or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
           *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # noqa: PLW1509
    server = ComfyServer(base, port, proc, log, own)
    _RUNNING.append(server)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}) during startup:\n{server.tail()}")
        try:
            server.get("/object_info", timeout=10)
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"ComfyUI did not answer /object_info in {timeout}s:\n{server.tail()}")


def txt2img_prompt(ckpt_name: str, text: str = "a red apple", *, seed: int = 0, steps: int = 1,
                   width: int = 64, height: int = 64, prefix: str = "conceptlab_e2e") -> dict:
    """A minimal API-format text-to-image workflow (core nodes only) for smoke tests."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 2.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                  "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
