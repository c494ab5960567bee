"""The FastAPI app behind `chatforge serve`: models, their schedulers, storage, auth, metrics, routes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.responses import Response

from chatforge.core.io import UserError
from chatforge.core.log import warn
from chatforge.server.errors import install_error_handlers
from chatforge.server.limits import BODY_TIMEOUT_S, MAX_BODY_BYTES, BodyLimits
from chatforge.server.metrics import Metrics

DEFAULT_MODEL = "smollm2-135m-instruct"
MAX_BATCH = 32
QUEUE_SIZE = 64
T = TypeVar("T")


@dataclass
class ServedModel:
    """One model exposed over the API under `id` and its `aliases`."""

    id: str
    model: Any
    tok: Any
    run_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    context: int = 2048
    scheduler: Any = None
    created: int = 0
    path: str = ""
    base: str | None = None
    """The base model dir whose one in-memory copy this model shares with others (a LoRA adapter on it, or the
    base itself), or None for a model loaded on its own."""


def _registry_entry(spec: str) -> dict | None:
    """The registry entry `spec` names (run id, unique prefix, or run dir), or None."""
    from chatforge.core.registry import find_run

    try:
        return find_run(spec)
    except (UserError, OSError, ValueError, KeyError):
        return None


def _resolve(spec: str) -> tuple[Path, str | None]:
    """(HF model dir, registry run id or None) of a --model spec: a name, run dir, registry id or HF dir."""
    from chatforge.core.model import resolve_model_path

    if spec == DEFAULT_MODEL:
        from chatforge.core.hub import builtin_gguf, cached_model

        if cached_model(spec) is None:
            builtin_gguf(spec)  # a clear UserError with the install hint (`make smollm2`) when it is missing
    try:
        path = resolve_model_path(spec)
    except UserError:
        entry = _registry_entry(spec) if not Path(spec).exists() else None
        if entry is None:
            raise
        path = resolve_model_path(entry["path"])
        return path, entry["run_id"]
    entry = _registry_entry(spec) if Path(spec).exists() else None  # a run dir: expose its run id
    return path, entry["run_id"] if entry else None


def _served(spec: str, path: Path, run_id: str | None, model: Any, tok: Any, base: str | None = None) -> ServedModel:
    """A loaded model exposed under its run id (if any) and a short name."""
    p = Path(path)
    short = p.parent.name if p.name == "model" else p.name
    short = spec if not Path(spec).exists() else short
    ident = run_id or short
    aliases = [a for a in dict.fromkeys([ident, short, spec]) if a]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ServedModel(id=ident, model=model, tok=tok, run_id=run_id, aliases=aliases, path=str(p), base=base,
                       context=int(getattr(cfg, "max_position_embeddings", 2048) or 2048), created=int(time.time()))


def load_served(spec: str, precision: str = "fp32") -> ServedModel:
    """Resolve and load a --model spec for serving, on its own (no shared base)."""
    from chatforge.core.model import for_inference, load_model_and_tokenizer

    path, run_id = _resolve(spec)
    model, tok, path = load_model_and_tokenizer(str(path))
    return _served(spec, path, run_id, for_inference(model, precision), tok)


class AdapterView:
    """One served model that is a LoRA adapter on a base shared with other served models (or the base itself,
    `name` = "__base__"). A call runs the shared peft model with this adapter on every row (peft's per-row
    `adapter_names`) under the base's lock, so the schedulers of one base never interleave their forwards;
    every other attribute is the peft model's."""

    BASE = "__base__"

    def __init__(self, peft_model: Any, name: str, lock: Any):
        self._peft, self._name, self._lock = peft_model, name, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        with self._lock:
            return self._peft(*args, adapter_names=[self._name] * int(ids.shape[0]), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peft, name)


def load_all_served(specs: list[str], precision: str = "fp32") -> list[ServedModel]:
    """Load every --model spec. LoRA runs that kept their adapter (core.model.ADAPTER_DIR) and whose base is
    used by two or more served models (adapters on it, or the base itself) share one copy of that base: the
    base is loaded once, each adapter is added to it by name, and each served model runs as an AdapterView.
    Everything else loads on its own (a lone LoRA run serves its merged model: no adapter cost per token)."""
    import threading

    from chatforge.core.model import for_inference, load_model_and_tokenizer, lora_adapter
    from chatforge.core.tokenizer import load_tokenizer

    resolved = [(spec, *_resolve(spec)) for spec in specs]
    adapters = [lora_adapter(path) for _, path, _ in resolved]
    key = [(a[1] if a else Path(path)).resolve() for (_, path, _), a in zip(resolved, adapters)]
    users: dict[Path, set[Path]] = {}
    for k, (_, path, _) in zip(key, resolved):
        users.setdefault(k, set()).add(Path(path).resolve())  # one run named twice is one user
    shared = {k for k, paths in users.items() if len(paths) > 1 and any(a and a[1].resolve() == k for a in adapters)}
    groups: dict[Path, dict] = {}
    out: list[ServedModel | None] = [None] * len(resolved)
    for i, ((spec, path, run_id), a) in enumerate(zip(resolved, adapters)):
        if key[i] not in shared:
            model, tok, path = load_model_and_tokenizer(str(path))
            out[i] = _served(spec, path, run_id, for_inference(model, precision), tok)
            continue
        g = groups.get(key[i])
        if g is None:
            base, base_tok, _ = load_model_and_tokenizer(str(key[i]))
            g = groups[key[i]] = {"model": base, "tok": base_tok, "peft": None, "names": {}, "lock": threading.Lock()}
        if a is None:  # the base itself
            g["names"][i] = AdapterView.BASE
            continue
        name = f"a{len(g['names'])}"
        if g["peft"] is None:
            from peft import PeftModel

            g["peft"] = PeftModel.from_pretrained(g["model"], str(a[0]), adapter_name=name, is_trainable=False)
        else:
            g["peft"].load_adapter(str(a[0]), adapter_name=name, is_trainable=False)
        g["names"][i] = name
    for k, g in groups.items():
        peft_model = for_inference(g["peft"], precision)
        for i, name in g["names"].items():
            spec, path, run_id = resolved[i]
            tok = g["tok"] if name == AdapterView.BASE else load_tokenizer(path)
            out[i] = _served(spec, path, run_id, AdapterView(peft_model, name, g["lock"]), tok, base=str(k))
    return [m for m in out if m is not None]


def create_app(models: list[str | ServedModel] | None = None, db_url: str | None = None, no_auth: bool = False,
               max_batch: int = MAX_BATCH, queue_size: int = QUEUE_SIZE, precision: str = "fp32",
               body_timeout_s: float = BODY_TIMEOUT_S, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The whole server: every model gets its own scheduler, all stepped by one thread; `/v1/*`, `/health`,
    `/metrics`."""
    from chatforge.core.generation import uses_fast_path
    from chatforge.core.tokenizer import stop_token_ids
    from chatforge.server import api
    from chatforge.server.scheduler import Scheduler, StepThread

    served: list[ServedModel] = []
    specs = [m for m in models or [DEFAULT_MODEL] if not isinstance(m, ServedModel)]
    loaded = iter(load_all_served(specs, precision)) if specs else iter(())
    for spec in models or [DEFAULT_MODEL]:
        m = spec if isinstance(spec, ServedModel) else next(loaded)
        same = next((s for s in served if m.path and s.path == m.path), None)
        if same is not None:  # one model named twice (e.g. run dir and run id): one copy in memory
            same.aliases += [a for a in m.aliases if a not in same.aliases]
            continue
        served.append(m)
    metrics = Metrics()
    by_name: dict[str, ServedModel] = {}
    for m in served:
        if not uses_fast_path(m.model):
            raise UserError(f"model {m.id}: serving needs plain full attention (sliding-window or hybrid "
                            "attention is not supported by the batching scheduler yet)")
        for a in m.aliases or [m.id]:
            if by_name.setdefault(a, m) is not m and a == m.id:
                raise UserError(f"two models would be served as '{a}'; serve one of them")
    stepper = StepThread()  # one torch thread steps every model (see StepThread)
    for m in served:
        m.scheduler = Scheduler(m.model, m.tok, stop_token_ids(m.tok), max_batch=max_batch, queue_size=queue_size,
                                metrics=metrics, model_name=m.id, stepper=stepper)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for m in served:
            m.scheduler.close()

    app = FastAPI(title="chatforge", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.state.models, app.state.served, app.state.metrics = by_name, served, metrics
    app.state.no_auth, app.state.max_batch, app.state.ignored_fields = no_auth, max_batch, set()
    app.state.db = None
    if db_url is not None:
        try:
            from chatforge.server.db import open_db
        except ImportError:
            warn("storage is not available in this build; completions are not stored")
        else:
            app.state.db = open_db(db_url)
    if no_auth:
        warn("--no-auth: the API accepts every request without a key; use it only on a trusted machine")
    app.include_router(api.router)
    with contextlib.suppress(ImportError):
        from chatforge.server.feedback import router as feedback_router

        app.include_router(feedback_router)
    if app.state.db is not None:  # the web app: same server, same database (its tables come with the migrations)
        from fastapi.responses import RedirectResponse

        from chatforge.server.web import install

        install(app, app.state.db.sessions)

        @app.get("/", include_in_schema=False)
        async def _root() -> RedirectResponse:
            return RedirectResponse("/app/", status_code=307)

    @app.get("/metrics")
    async def _metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def off_main_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (loading models, any torch work before serving) in a short-lived thread and return its result.

    Why: libgomp gives every thread that starts an OpenMP region its own pool of workers and, once the process
    has more OpenMP threads than CPUs, lets idle workers spin only ~100 times before sleeping. Had the main
    thread loaded the model, its pool would outlive the load, and the scheduler thread's own pool would pay a
    futex wake-up on every parallel op: measured on 2 cores, an fp16 576->1536 linear at batch 1 took 96 us
    from a second thread vs 52 us alone, and the single stream ran 40 % slower. A thread that exits frees its
    pool, so the scheduler's is the only one left.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="chatforge-load", daemon=True)  # Ctrl-C need not wait for it
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def default_db_url() -> str | None:
    """runs/chatforge.db when storage is part of this build, else None (completions are not stored)."""
    try:
        from chatforge.server.db import open_db  # noqa: F401
    except ImportError:
        return None
    return "sqlite:///runs/chatforge.db"


def serve(models: list[str] | None, db: str | None, host: str, port: int, no_auth: bool, max_batch: int,
          queue_size: int = QUEUE_SIZE, precision: str = "fp32", demo: bool = False) -> None:
    """`chatforge serve`: build the app and run it under uvicorn (blocks until Ctrl-C). `demo`: create a
    local admin, a ranking campaign and a demonstration prompt set first (web.demo)."""
    import uvicorn

    from chatforge.core.log import console

    if demo and db is None:
        raise UserError("--demo needs a database for the web app (leave --db out for runs/chatforge.db)")
    app = off_main_thread(lambda: create_app(models or None, db_url=db, no_auth=no_auth, max_batch=max_batch,
                                             queue_size=queue_size, precision=precision))
    for m in app.state.served:
        others = ", ".join(a for a in m.aliases if a != m.id)
        console.print(f"model {m.id}" + (f" (also: {others})" if others else "") + f" from {m.path}"
                      + (f" (LoRA on the shared base {m.base})" if m.base else ""), soft_wrap=True)
    console.print(f"OpenAI-compatible API on http://{host}:{port}/v1 (metrics: /metrics; Ctrl-C stops)", soft_wrap=True)
    if app.state.db is not None:
        console.print(f"web app on http://{host}:{port}/app/ (accounts: chatforge users create)", soft_wrap=True)
    if demo:
        from chatforge.server.web.demo import setup_demo

        info = off_main_thread(lambda: setup_demo(app.state.db.sessions, app.state.served[0]))
        console.rule("[bold]demo")
        console.print(f"open http://{host}:{port}/app/login", soft_wrap=True)
        if info["password"]:
            console.print(f"user [bold]admin[/bold], one-time password [bold]{info['password']}[/bold] "
                          "(the first login asks you to choose your own)", soft_wrap=True)
        else:
            console.print("user [bold]admin[/bold] with the password you chose (forgotten? "
                          "chatforge users create admin --one-time --force)", soft_wrap=True)
        console.print(f"{info['tasks']} ranking tasks ready under Rank" +
                      ("; a demonstration prompt set under Write" if info.get("prompt_set") else ""), soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
