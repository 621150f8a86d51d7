"""`tritonchat deploy`: a new model version in a running tritonserver, without a restart.

Triton in explicit model-control mode (`tritonchat serve` runs it so) loads a model again when asked,
and its config's `version_policy` says which version folders (`REPO/generator/<N>/`) it serves. A switch
is one load with the policy `specific: [target]`: Triton loads the target while the current version
keeps serving, then sends new requests to the target (the entry model asks for the latest ready
version) and unloads the current version once its requests in flight have finished. Only the target
is loaded by that call, so the peak is two versions in memory, never three. Rolling back is the same
switch to the previous version, whose folder stays in the repository.

    stage_version(repo, source)           REPO/generator/<N+1> from another built repository (manifest kept)
    switch_version(admin, model, target)  load target, wait ready, drain and unload the others
    persist_version(repo, model, target)  write the choice into config.pbtxt, so a restart serves it too

Only the generator changes between versions: the tokenizer and the model's config.pbtxt must be the
same as the running repository's (anything else is a new deployment: restart, or a rolling update).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tritonchat.python_backend.manifest import MANIFEST, sha256_file
from tritonchat.security import key_headers

DEFAULT_MODEL = "generator"
ADMIN_KEY_ENV = "TRITONCHAT_ADMIN_KEY"
API_KEY_ENV = "TRITONCHAT_API_KEY"
# a load compiles and warms the engine (minutes for a large model on a GPU); a drain lasts as long as
# the longest stream in flight
LOAD_TIMEOUT_S = 1800.0
DRAIN_TIMEOUT_S = 600.0


class DeployError(RuntimeError):
    """A deployment step failed; the message says what is still serving and what to do."""


# ------------------------------------------------------------------------------------------ server side


class Admin:
    """Triton's model-repository API (HTTP, through tritonclient) with the keys on every call: the admin key
    for the repository index and loads, the API key for the model config (`tritonchat serve` locks them so)."""

    def __init__(self, url: str, admin_key: Optional[str] = None, api_key: Optional[str] = None,
                 load_timeout: float = LOAD_TIMEOUT_S):
        import tritonclient.http as httpclient

        self.url = url.removeprefix("http://").rstrip("/")
        self.headers = key_headers("http", api_key=api_key, admin_key=admin_key)
        self._client = httpclient.InferenceServerClient(self.url, connection_timeout=10.0,
                                                        network_timeout=load_timeout)

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, headers=self.headers, **kwargs)
        except InferenceServerException as exc:
            raise DeployError(f"{what} failed on {self.url}: {exc.message()}{_hint(exc.message())}") from exc
        except Exception as exc:  # connection refused, timeouts: tritonclient raises what its transport raises
            raise DeployError(f"{what} failed: {self.url} cannot be reached ({type(exc).__name__}: {exc}); "
                              "is the server running, and is this its HTTP port?") from exc

    def versions(self, model: str) -> Dict[int, Tuple[str, str]]:
        """{version: (state, reason)} for every version of `model` the server knows (loaded once or now)."""
        index = self._call("reading the model repository index", self._client.get_model_repository_index)
        return {int(e["version"]): (e.get("state", ""), e.get("reason", ""))
                for e in index if e.get("name") == model and str(e.get("version", "")).isdigit()}

    def serving(self, model: str) -> List[int]:
        return sorted(v for v, (state, _) in self.versions(model).items() if state == "READY")

    def config(self, model: str) -> dict:
        return self._call(f"reading {model}'s config", self._client.get_model_config, model)

    def load(self, model: str, config: dict) -> None:
        self._call(f"loading {model}", self._client.load_model, model, config=json.dumps(config))

    def ready(self, model: str, version: int) -> bool:
        return bool(self._call("readiness", self._client.is_model_ready, model, str(version)))


def _hint(message: str) -> str:
    low = message.lower()
    if "polling is enabled" in low or ("not allowed" in low and "load" in low):
        return (" (the server does not take load requests: start it in explicit model-control mode, "
                "`--model-control-mode=explicit --load-model=*`, as `tritonchat serve` does)")
    if "restricted" in low and "authorization" in low:
        return (f" (this API needs the server's API key: --api-key-file, or ${API_KEY_ENV}; "
                "`tritonchat serve --api-key-file` sets it)")
    if "restricted" in low or "unauthorized" in low or "forbidden" in low:
        return (f" (an admin API: pass the server's admin key with --admin-key-file, or in ${ADMIN_KEY_ENV}; "
                "`tritonchat serve --admin-key-file` sets it)")
    return ""


@dataclass
class Switch:
    model: str
    target: int
    before: List[int]  # the versions that were serving
    load_s: float = 0.0  # the target loaded and ready (the others still serving)
    drain_s: float = 0.0  # the others finished their requests in flight and were unloaded


def switch_version(admin: Admin, model: str, target: int, *, drain_timeout: float = DRAIN_TIMEOUT_S,
                   say: Callable[[str], None] = lambda _: None) -> Switch:
    """Serve version `target` of `model` instead of the versions serving now (see the module doc)."""
    before = admin.serving(model)
    result = Switch(model, target, before)
    if before == [target]:
        say(f"{model} version {target} is already the one serving")
        return result
    config = admin.config(model)
    config["version_policy"] = {"specific": {"versions": [target]}}
    say(f"loading {model} version {target} (serving now: {_names(before)})")
    t0 = time.monotonic()
    try:
        admin.load(model, config)
    except DeployError as exc:
        now = admin.serving(model)
        reason = admin.versions(model).get(target, ("", ""))[1]
        raise DeployError(f"{model} version {target} did not load: {reason or exc}. "
                          f"Still serving: {_names(now)}.") from exc
    if not admin.ready(model, target):
        raise DeployError(f"{model} version {target} loaded but is not ready; serving: {_names(admin.serving(model))}")
    result.load_s = time.monotonic() - t0
    say(f"{model} version {target} ready in {result.load_s:.1f} s; new requests go to it")
    t1 = time.monotonic()
    old = [v for v in before if v != target]
    while True:  # Triton unloads each old version once its last request in flight has finished
        states = admin.versions(model)
        busy = [v for v in old if states.get(v, ("",))[0] in ("READY", "UNLOADING")]
        if not busy:
            break
        if time.monotonic() - t1 > drain_timeout:
            raise DeployError(f"{model} version {target} serves new requests, but {_names(busy)} still finish(es) "
                              f"requests in flight after {drain_timeout:.0f} s (Triton unloads them when done)")
        time.sleep(0.1)
    result.drain_s = time.monotonic() - t1
    if old:
        say(f"drained and unloaded {_names(old)} in {result.drain_s:.1f} s")
    return result


def _names(versions) -> str:
    return ", ".join(f"version {v}" for v in versions) or "no version"


# ------------------------------------------------------------------------------------------ repository side


def version_dirs(repo: Path, model: str = DEFAULT_MODEL) -> List[int]:
    d = Path(repo) / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def read_config(path: Path):
    """config.pbtxt as Triton's ModelConfig message (the proto tritonclient ships)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise DeployError(f"{path}: not a readable Triton model config ({exc})") from exc


def _generate_param(config) -> str:
    """The entry's `generate` parameter in a config (a ModelConfig message, or Triton's JSON)."""
    if isinstance(config, dict):
        return (config.get("parameters", {}).get("generate") or {}).get("string_value", "")
    return config.parameters["generate"].string_value if "generate" in config.parameters else ""


def _refuse_engine_in_entry(generate: str) -> None:
    if generate == "entry":
        raise DeployError("this repository runs the engine inside the `ensemble` model (models.ensemble.generate: "
                          "entry), which reads generator/1 once at its start: a version switch of `generator` would "
                          "change nothing. Restart with the new build, or build with generate: generator for hot "
                          "version switches")


def stage_version(repo: Path, source: Path, model: str = DEFAULT_MODEL) -> int:
    """Copy the newest version folder of `source` (a built repository, or a version folder itself) into
    `repo/model/<N+1>` and add its files to the manifest; returns N+1. Nothing is loaded."""
    repo, source = Path(repo).absolute(), Path(source).absolute()
    if not (repo / MANIFEST).is_file():
        raise DeployError(f"{repo} has no {MANIFEST}: not a repository built by `tritonchat build`")
    entry = repo / "ensemble" / "config.pbtxt"
    if model == DEFAULT_MODEL and entry.is_file():
        _refuse_engine_in_entry(_generate_param(read_config(entry)))
    if (source / model / "config.pbtxt").is_file():  # a whole repository: take its newest version
        versions = version_dirs(source, model)
        if not versions:
            raise DeployError(f"{source / model} has no version folder")
        _same_config(repo / model / "config.pbtxt", source / model / "config.pbtxt")
        src_dir = source / model / str(versions[-1])
    elif source.is_dir() and any(source.iterdir()):
        src_dir = source
    else:
        raise DeployError(f"{source} is neither a built repository (with {model}/config.pbtxt) nor a version folder")
    _same_tokenizer(repo, src_dir)
    current = version_dirs(repo, model)
    if not current:
        raise DeployError(f"{repo / model} has no version folder to deploy beside")
    # pin what serves now before a higher folder appears: a restart in between must not switch by itself
    policy = read_config(repo / model / "config.pbtxt").version_policy
    pinned = list(policy.specific.versions) or [current[-1]]
    if not policy.specific.versions:
        _write_policy(repo, model, pinned)
    target = current[-1] + 1
    tmp = repo / model / f".staging-{target}"  # not a number: Triton ignores it until it is renamed
    shutil.rmtree(tmp, ignore_errors=True)
    # hard links where the two repositories share a file system (weights are large; builds never modify
    # files in place), copies elsewhere
    shutil.copytree(src_dir, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("__pycache__"))
    tmp.rename(repo / model / str(target))
    _update_manifest(repo, [f"{model}/{target}"], model,
                     deployed={"staged": target, "source": str(source), "serving": pinned[-1]})
    return target


def persist_version(repo: Path, model: str, target: int) -> None:
    """Write `version_policy: specific [target]` into REPO/model/config.pbtxt (and the manifest)."""
    _write_policy(Path(repo), model, [target])
    _update_manifest(Path(repo), [], model, deployed={"serving": target})


def previous_version(current: int, repo: Optional[Path], admin: Optional[Admin], model: str) -> int:
    """The version served before `current`: from the repository's deploy history, else the highest lower
    version the server or the repository knows."""
    if repo is not None and (Path(repo) / MANIFEST).is_file():
        history = json.loads((Path(repo) / MANIFEST).read_text()).get("deploy", {}).get(model, {}).get("history", [])
        earlier = [v for v in history if v != current]
        if earlier:
            return earlier[-1]
    known = set(version_dirs(repo, model)) if repo is not None else set()
    if admin is not None:
        known |= set(admin.versions(model))
    lower = sorted(v for v in known if v < current)
    if not lower:
        raise DeployError(f"no version of {model} before version {current} is known: give --version N")
    return lower[-1]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _same_config(ours: Path, theirs: Path) -> None:
    a, b = read_config(ours), read_config(theirs)
    a.ClearField("version_policy")
    b.ClearField("version_policy")
    if a != b:
        from google.protobuf import text_format

        la, lb = text_format.MessageToString(a).splitlines(), text_format.MessageToString(b).splitlines()
        diff = [f"{x.strip()}  ->  {y.strip()}" for x, y in zip(la, lb) if x != y][:3] or ["(fields added/removed)"]
        raise DeployError(f"{theirs} differs from the serving {ours} ({'; '.join(diff)}): a version shares its "
                          "model's config, so this build is a new deployment (restart or roll the pods), "
                          "not a version")


def _same_tokenizer(repo: Path, version_dir: Path) -> None:
    """The new generator's tokenizer must be the one preprocessing/postprocessing already use."""
    ours, theirs = repo / "preprocessing" / "1" / "tokenizer", version_dir / "tokenizer"
    if not theirs.is_dir() or not ours.is_dir():
        return
    digest = lambda d: {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}
    if digest(ours) != digest(theirs):
        raise DeployError(f"{theirs} is not the tokenizer the running repository uses ({ours}): a model with "
                          "another tokenizer is a new deployment, not a version")


def _write_policy(repo: Path, model: str, versions: List[int]) -> None:
    path = repo / model / "config.pbtxt"
    text = _without_top_level(path.read_text(), "version_policy").rstrip("\n")
    text += f"\n\nversion_policy: {{ specific: {{ versions: [{', '.join(map(str, versions))}] }} }}\n"
    _atomic_write(path, text)
    read_config(path)  # what Triton will parse
    _update_manifest(repo, [f"{model}/config.pbtxt"], model)


def _without_top_level(text: str, field: str) -> str:
    """`text` without the top-level `field { ... }` / `field: { ... }` block (comments kept)."""
    out, i, depth, n = [], 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":  # a comment runs to the end of the line
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        if depth == 0 and text.startswith(field, i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            j = text.find("{", i)
            level = 0
            while j < n:
                level += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if level == 0:
                    break
            i = j
            continue
        depth += {"{": 1, "}": -1, "[": 1, "]": -1}.get(c, 0)
        out.append(c)
        i += 1
    return "".join(out)


def _update_manifest(repo: Path, paths: List[str], model: str, deployed: Optional[dict] = None) -> None:
    """Re-hash `paths` (files, or folders: every file under them) in REPO/manifest.json; record `deployed`."""
    path = repo / MANIFEST
    manifest = json.loads(path.read_text())
    files = manifest.setdefault("files", {})
    for rel in paths:
        p = repo / rel
        found = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts)
        for f in found:
            files[f.relative_to(repo).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    if deployed:
        entry = manifest.setdefault("deploy", {}).setdefault(model, {"history": []})
        if "serving" in deployed:
            if not entry["history"] or entry["history"][-1] != deployed["serving"]:
                entry["history"].append(deployed["serving"])
            entry["serving"] = deployed["serving"]
        if "staged" in deployed:
            entry.setdefault("sources", {})[str(deployed["staged"])] = deployed["source"]
    manifest["files"] = dict(sorted(files.items()))
    _atomic_write(path, json.dumps(manifest, indent=2))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a model loading meanwhile reads the old file or the new one, never half


# ------------------------------------------------------------------------------------------ the command


def run_deploy(url: str, *, repo: Optional[Path] = None, source: Optional[Path] = None, version: Optional[int] = None,
               rollback: bool = False, model: str = DEFAULT_MODEL, admin_key: Optional[str] = None,
               api_key: Optional[str] = None, drain_timeout: float = DRAIN_TIMEOUT_S, load_timeout: float = LOAD_TIMEOUT_S,
               stage_only: bool = False) -> int:
    """`tritonchat deploy`; returns the exit status."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    say = lambda msg: console.print(escape(msg), soft_wrap=True)  # noqa: E731
    if sum(x is not None and x is not False for x in (source, version, rollback or None)) > 1:
        console.print("[red]error:[/] give one of --from, --version, --rollback")
        return 2
    if source is not None and repo is None:
        console.print("[red]error:[/] --from needs --repo (the repository the server serves, to copy the version into)")
        return 2
    admin = Admin(url, admin_key or os.environ.get(ADMIN_KEY_ENV), api_key or os.environ.get(API_KEY_ENV),
                  load_timeout=load_timeout)
    try:
        if source is not None:
            version = stage_version(repo, source, model)
            say(f"staged {source} as {repo / model / str(version)}")
            if stage_only:
                return 0
        if model == DEFAULT_MODEL and (version is not None or rollback):
            try:
                generate = _generate_param(admin.config("ensemble"))
            except DeployError:  # no entry model of that name: nothing to refuse; the switch says what is wrong
                generate = ""
            _refuse_engine_in_entry(generate)
        serving = admin.serving(model)
        if rollback:
            if len(serving) != 1:
                raise DeployError(f"rollback needs one version serving; serving: {_names(serving)}")
            version = previous_version(serving[0], repo, admin, model)
        if version is None:  # status
            states = admin.versions(model)
            for v in sorted(set(states) | set(version_dirs(repo, model) if repo else [])):
                state, reason = states.get(v, ("on disk, never loaded", ""))
                say(f"{model} version {v}: {state}{' (' + reason + ')' if reason else ''}")
            return 0
        result = switch_version(admin, model, version, drain_timeout=drain_timeout, say=say)
        if result.before == [version]:
            return 0
        if repo is not None:
            persist_version(repo, model, version)
            say(f"recorded in {repo / model / 'config.pbtxt'}: a restart serves version {version}")
        else:
            say("not recorded on disk (no --repo): a restart serves what config.pbtxt's version_policy says")
        console.print(f"[green]{escape(model)} version {version} serving[/] "
                      f"(load {result.load_s:.1f} s, drain {result.drain_s:.1f} s)")
        return 0
    except DeployError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    finally:
        admin.close()
