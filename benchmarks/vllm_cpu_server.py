"""Starts and stops a vLLM server on this machine's CPU (scripts/serve_vllm_cpu.sh) for the benchmarks and the
tests that need a real one. Training and evaluation never start servers: they reach one by URL (vlm.VLLMClient)."""
import os
import signal
import socket
import subprocess
import time
import urllib.request

from vlm import VLLMServerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_CPU_SCRIPT = os.path.join(ROOT, "scripts", "serve_vllm_cpu.sh")


def start_cpu_server(model_dir, log_path, port=None, deadline_s=400):
    """Starts scripts/serve_vllm_cpu.sh on 127.0.0.1:port (a free one by default), its output appended to
    log_path, and returns (process, url) once /health answers. It runs in a process group of its own, so
    stop_server ends vLLM's engine and worker processes with it."""
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    with open(log_path, "ab") as log:
        process = subprocess.Popen([SERVE_CPU_SCRIPT, str(model_dir), str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if process.poll() is not None:
            raise VLLMServerError(f"vllm serve exited with code {process.returncode}; the end of {log_path}:\n"
                                  + _tail(log_path))
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:  # not listening yet, or 503 while it loads
            time.sleep(1)
    stop_server(process)
    raise VLLMServerError(f"vllm serve did not answer {url}/health within {deadline_s} s; the end of "
                          f"{log_path}:\n" + _tail(log_path))


def stop_server(process, grace_s=30):
    """SIGTERM to the server's process group, SIGKILL after grace_s seconds and for any process left over."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already
        pass
    process.wait()


def _tail(path, lines=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
