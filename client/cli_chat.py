"""``tritonchat chat``: send one prompt, print the answer as it arrives, then a one-line summary;
``tritonchat chat -i``: a multi-turn conversation that keeps the history (:func:`run_repl`)."""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from .errors import AccessDenied, RequestTimeout, ServerUnavailable, TritonChatError
from .params import GenerationParams
from .sync import ChatClient

__all__ = ["run_chat", "run_repl", "format_summary"]


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _print_error(message: str) -> None:
    from rich.text import Text

    _console().print(Text(message, style="red"))


def format_summary(finish_reason: Optional[str], n_in: Optional[int], n_out: Optional[int],
                   t_start: float, t_first: Optional[float], t_end: float, streamed: bool) -> str:
    """``finish=stop · 12 prompt + 34 output tokens · TTFT 0.081 s · 45.6 tok/s · 0.83 s``.

    tok/s is the decode rate after the first piece when streaming ((n-1) / (end - first)),
    otherwise output tokens over the whole request time."""
    parts = [f"finish={finish_reason or '?'}"]
    parts.append(f"{'?' if n_in is None else n_in} prompt + {'?' if n_out is None else n_out} output tokens")
    total = max(t_end - t_start, 1e-9)
    if streamed and t_first is not None:
        parts.append(f"TTFT {t_first - t_start:.3f} s")
        decode = t_end - t_first
        if n_out is not None and n_out > 1 and decode > 1e-6:
            rate = (n_out - 1) / decode
        else:
            rate = (n_out or 0) / total
    else:
        rate = (n_out or 0) / total
    parts.append(f"{rate:.1f} tok/s")
    parts.append(f"{total:.2f} s")
    return " · ".join(parts)


def run_chat(prompt: str, url: Optional[str] = None, protocol: str = "grpc", stream: bool = True,
             max_tokens: int = 128, temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, stop: Optional[List[str]] = None,
             raw: bool = False, model_name: str = "ensemble", api_key: Optional[str] = None) -> int:
    """Returns the exit code: 0 ok, 1 cannot reach the server (or timeout), 2 request refused /
    other error, 130 interrupted. `api_key` None: ``$TRITONCHAT_API_KEY``."""
    try:
        client = ChatClient(url, protocol=protocol, model=model_name, api_key=api_key)
    except ValueError as exc:
        _print_error(f"error: {exc}")
        return 2
    try:
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop=list(stop) if stop else None,
                                  apply_chat_template=None if raw else True)
    except TritonChatError as exc:
        _print_error(f"error: {exc.message}")
        return 2

    out = sys.stdout
    printed_any = False
    last_char = "\n"
    t_start = time.perf_counter()
    t_first: Optional[float] = None
    handle = None
    try:
        if stream:
            handle = client.stream(prompt, params)
            pieces: List[str] = []
            t_first = _echo(handle, out, pieces)
            if pieces:
                printed_any, last_char = True, pieces[-1][-1]
            completion = handle.completion
        else:
            completion = client.generate(prompt, params)
            if completion.text:
                out.write(completion.text)
                out.flush()
                printed_any = True
                last_char = completion.text[-1]
        t_end = time.perf_counter()
        if printed_any and last_char != "\n":
            out.write("\n")
            out.flush()
        from rich.text import Text

        _console().print(Text(format_summary(completion.finish_reason, completion.num_input_tokens,
                                             completion.num_output_tokens, t_start, t_first, t_end, stream),
                              style="dim"))
        return 0
    except KeyboardInterrupt:
        if handle is not None:
            handle.cancel()
        if printed_any and last_char != "\n":
            out.write("\n")
            out.flush()
        _print_error("cancelled")
        return 130
    except TritonChatError as exc:
        if printed_any and last_char != "\n":
            out.write("\n")
            out.flush()
        kind = type(exc).__name__
        if isinstance(exc, AccessDenied):
            hint = "the key was refused" if client.api_key else "no key was sent"
            _print_error(f"{kind}: {exc.message} ({hint}: pass --api-key or set TRITONCHAT_API_KEY)")
            return 2
        if isinstance(exc, (ServerUnavailable, RequestTimeout)):
            _print_error(f"{kind}: {exc.message} (is the server running at {client.url} over {client.protocol}?)")
            return 1
        _print_error(f"{kind}: {exc.message}")
        return 2
    finally:
        if handle is not None:
            handle.close()
        client.close()


REPL_HELP = "/reset: forget the conversation · /system TEXT: set the system message · /history · /exit (or Ctrl-D)"


def run_repl(first: Optional[str] = None, url: Optional[str] = None, protocol: str = "grpc",
             max_tokens: int = 128, temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, stop: Optional[List[str]] = None,
             system: Optional[str] = None, model_name: str = "ensemble", api_key: Optional[str] = None,
             stdin=None) -> int:
    """``tritonchat chat -i``: a multi-turn conversation. Every turn sends the whole history as chat messages
    (the server renders them with the model's chat template); answers stream to stdout, prompts and
    summaries go to stderr. Ctrl-C during an answer stops it (what arrived stays in the history);
    Ctrl-D or /exit ends. A refused turn is dropped from the history. Returns the exit code."""
    from rich.text import Text

    stdin = stdin or sys.stdin
    console = _console()
    try:
        client = ChatClient(url, protocol=protocol, model=model_name, api_key=api_key)
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop=list(stop) if stop else None, apply_chat_template=True)
    except (ValueError, TritonChatError) as exc:
        _print_error(f"error: {getattr(exc, 'message', exc)}")
        return 2
    history: List[dict] = []
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and recall for input()
        except ImportError:
            pass
        console.print(Text(f"chatting with {model_name} at {client.url} ({client.protocol}) · {REPL_HELP}",
                           style="dim"))
    pending = first
    try:
        while True:
            if pending is not None:
                line, pending = pending, None
            else:
                console.print(Text("you> ", style="bold"), end="")
                line = stdin.readline()
                if not line:  # Ctrl-D / end of input
                    if interactive:
                        console.print()
                    return 0
                line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/exit", "/quit"):
                    return 0
                if cmd == "/reset":
                    history.clear()
                    console.print(Text("(conversation cleared)", style="dim"))
                elif cmd == "/system":
                    system = arg.strip() or None
                    console.print(Text(f"(system message {'set' if system else 'removed'})", style="dim"))
                elif cmd == "/history":
                    for m in ([{"role": "system", "content": system}] if system else []) + history:
                        console.print(Text.assemble((f"{m['role']}: ", "bold"), m["content"]))
                else:
                    console.print(Text(f"unknown command {cmd}; {REPL_HELP}", style="yellow"))
                continue
            history.append({"role": "user", "content": line})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            answer = _one_turn(client, messages, params, console)
            if answer is None:
                history.pop()  # refused: the turn never happened
            else:
                history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:  # at the prompt
        console.print()
        return 130
    finally:
        client.close()


def _echo(handle, out, pieces: List[str]) -> Optional[float]:
    """Write a stream's text to `out` as it arrives (kept in `pieces`); when its first text came."""
    t_first = None
    for delta in handle:
        if delta.text:
            if t_first is None:
                t_first = time.perf_counter()
            out.write(delta.text)
            out.flush()
            pieces.append(delta.text)
    return t_first


def _one_turn(client: ChatClient, messages: List[dict], params: GenerationParams, console) -> Optional[str]:
    """Stream one answer to stdout; the text that arrived (also when stopped with Ctrl-C), None if refused."""
    from rich.text import Text

    out = sys.stdout
    pieces: List[str] = []
    t_start = time.perf_counter()
    t_first: Optional[float] = None
    handle = client.stream(messages, params)
    try:
        t_first = _echo(handle, out, pieces)
        comp = handle.completion
        if pieces and not pieces[-1].endswith("\n"):
            out.write("\n")
            out.flush()
        console.print(Text(format_summary(comp.finish_reason, comp.num_input_tokens, comp.num_output_tokens,
                                          t_start, t_first, time.perf_counter(), True), style="dim"))
        return "".join(pieces)
    except KeyboardInterrupt:
        handle.cancel()
        if pieces:
            out.write("\n")
            out.flush()
        console.print(Text("(stopped)", style="dim"))
        return "".join(pieces)
    except TritonChatError as exc:
        if pieces:
            out.write("\n")
            out.flush()
        _print_error(f"{type(exc).__name__}: {exc.message}")
        return "".join(pieces) if pieces else None
    finally:
        handle.close()
