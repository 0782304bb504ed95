"""``kvtool chat MODEL``: an interactive streaming chat with the GGUF's own chat template.

* readline line editing and history (``~/.cache/kvtool/history``) when stdin is a terminal; with piped stdin it
  reads one message (or command) per line until EOF, so scripts and tests drive it;
* Ctrl-C during a reply stops that reply (a second Ctrl-C abandons it at once); at the prompt it clears the line;
  Ctrl-D or ``/exit`` quits;
* ``<think>…</think>`` is dimmed on a terminal, shown or hidden with ``--show-think/--hide-think`` or ``/think``;
* after each reply a status line (stderr): tokens, tok/s, context use, KV allocated vs a full cache.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable, Optional

import click

from ..errors import KvtoolError
from ..fmt import fmt_bytes
from .generate import fmt_rate, kv_summary, load_model, load_options, run_standalone, status_line

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
OPEN, CLOSE = "<think>", "</think>"

HELP = """commands:
  /reset         forget the conversation (keeps the system prompt)
  /stats         KV cache and last reply statistics
  /system TEXT   set the system prompt (no TEXT: show it; '/system -' removes it)
  /think         toggle showing <think> blocks
  /exit          quit (also /quit, Ctrl-D)"""


class ThinkSplitter:
    """Splits streamed text into ("text" | "think", piece) segments; tags may arrive split across pieces."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self._buf = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self._buf += piece
        out: list[tuple[str, str]] = []
        while self._buf:
            tag = CLOSE if self.in_think else OPEN
            i = self._buf.find(tag)
            if i >= 0:
                if i:
                    out.append(self._seg(self._buf[:i]))
                out.append(("close" if self.in_think else "open", tag))
                self._buf = self._buf[i + len(tag):]
                self.in_think = not self.in_think
                continue
            # keep back a suffix that could be the start of the tag
            keep = 0
            for k in range(min(len(tag) - 1, len(self._buf)), 0, -1):
                if tag.startswith(self._buf[-k:]):
                    keep = k
                    break
            emit = self._buf[:len(self._buf) - keep]
            if emit:
                out.append(self._seg(emit))
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf, ""
        return [self._seg(rest)] if rest else []

    def _seg(self, s: str) -> tuple[str, str]:
        return ("think" if self.in_think else "text", s)


class Renderer:
    """Writes segments to stdout: think dimmed on a TTY, hidden when asked (a one-line marker on a TTY)."""

    def __init__(self, out, tty: bool, show_think: bool):
        self.out, self.tty, self.show_think = out, tty, show_think
        self._hidden_chars = 0

    def write(self, kind: str, s: str) -> None:
        if kind == "open":
            self._hidden_chars = 0
            if self.show_think:
                self._w(f"{DIM}{s}" if self.tty else s)
            elif self.tty:
                self._w(f"{DIM}[thinking…]{RESET}")
        elif kind == "close":
            if self.show_think:
                self._w(f"{s}{RESET}" if self.tty else s)
            elif self.tty:
                self._w(f"{DIM}[thought for {self._hidden_chars} chars; /think shows it]{RESET}\n")
        elif kind == "think":
            self._hidden_chars += len(s)
            if self.show_think:
                self._w(s)
        else:
            self._w(s)

    def end(self) -> None:
        if self.tty:
            self._w(RESET)
        self._w("\n")

    def _w(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()


def _history_file():
    from ..paths import cache_root

    return cache_root() / "history"


def _setup_readline() -> Optional[Callable[[], None]]:
    """Load history; returns the function that saves it (None without readline)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    path = _history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(str(path))
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(str(path))
        except OSError:
            pass

    return save


class ChatSession:
    """The REPL's state: messages, the system prompt and display settings (separate from I/O for testing)."""

    def __init__(self, model, system: Optional[str], gen_kw: dict, show_think: bool, tty_out: bool, out=None,
                 err=None):
        self.m = model
        self.system = system
        self.kw = gen_kw
        self.history: list[dict] = []
        self.show_think = show_think
        self.tty = tty_out
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._stops = 0

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def say(self, s: str, err: bool = False) -> None:
        f = self.err if err else self.out
        f.write(s + "\n")
        f.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/reset":
            self.history.clear()
            self.m.reset()
            self.say("[conversation cleared]", err=True)
        elif cmd == "/stats":
            self.say(self.stats_text())
        elif cmd == "/system":
            if not arg:
                self.say(f"system: {self.system!r}" if self.system else "system: (none)")
            else:
                self.system = None if arg == "-" else arg
                self.say("[system prompt removed]" if arg == "-" else "[system prompt set]", err=True)
        elif cmd == "/think":
            self.show_think = not self.show_think
            self.say(f"[<think> blocks {'shown' if self.show_think else 'hidden'}]", err=True)
        elif cmd in ("/help", "/?"):
            self.say(HELP)
        else:
            self.say(f"unknown command {cmd}; /help lists them", err=True)
        return True

    def stats_text(self) -> str:
        kv = self.m.kv_stats()
        groups = ", ".join(f"W={g['window']}:{g['cells']} cells" for g in kv["groups"]) or "-"
        lines = [f"model        {self.m.path}",
                 f"kv           {kv_summary(kv)}",
                 f"kv parts     full heads {fmt_bytes(kv['full_bytes'])}, rings {fmt_bytes(kv['ring_bytes'])}; "
                 f"groups {groups}",
                 "kv buffers   " + (", ".join(f"{b['group']} {b['device']} {fmt_bytes(b['bytes'])}"
                                              for b in kv["buffers"]) or "-") + f"; gpu layers {kv['gpu_layers']}",
                 f"live cells   full {kv['live_full_cells']}, ring {kv['live_ring_cells']}; "
                 f"context {kv['context_tokens']}/{kv['n_ctx']}",
                 f"settings     flash_attn={kv['flash_attn']} cache={kv['cache_type']} n_ubatch={kv['n_ubatch']} "
                 f"threads={kv['n_threads']}",
                 f"turns        {sum(1 for m in self.history if m['role'] == 'user')}"]
        st = self.m.last_stats
        if st is not None:
            d = st.as_dict()
            lines.append(f"last reply   {d['generated_tokens']} tokens, decode {fmt_rate(d['decode_tok_s'])} tok/s, "
                         f"prefill {d['prompt_eval_tokens']} tok ({d['cached_tokens']} reused) at "
                         f"{fmt_rate(d['prefill_tok_s'])} tok/s, finish={d['finish_reason']}")
        return "\n".join(lines)

    def reply(self, user: str) -> None:
        """Stream one reply. Ctrl-C stops it (the partial reply stays in the conversation)."""
        self.history.append({"role": "user", "content": user})
        msgs = self.messages()
        try:
            starts_in_think = self.m.chat_prompt(msgs).rstrip().endswith(OPEN)
            it = self.m.chat(msgs, stream=True, **self.kw)
        except KvtoolError:
            self.history.pop()
            raise
        split = ThinkSplitter(in_think=starts_in_think)
        r = Renderer(self.out, self.tty, self.show_think)
        if starts_in_think:
            r.write("open", OPEN)
        text = []
        self._stops = 0
        old = _install_sigint(self._on_sigint)
        try:
            for piece in it:
                text.append(piece)
                for kind, s in split.feed(piece):
                    r.write(kind, s)
            for kind, s in split.flush():
                r.write(kind, s)
        except KeyboardInterrupt:  # second Ctrl-C: abandon at once; the cache may hold a half step, so drop it
            it.close()
            self.m.reset()
            self.out.write(RESET if self.tty else "")
            self.say("\n[interrupted]", err=True)
        finally:
            _restore_sigint(old)
        r.end()
        reply = ("<think>" if starts_in_think else "") + "".join(text)
        self.history.append({"role": "assistant", "content": reply})
        if self.m.last_stats is not None:
            self.say(_dim(status_line(self.m.last_stats, self.m.kv_stats()), self.tty and _isatty(self.err)),
                     err=True)

    def _on_sigint(self, signum, frame) -> None:
        self._stops += 1
        if self._stops == 1:
            self.m.stop()
        else:
            raise KeyboardInterrupt


def _dim(s: str, on: bool) -> str:
    return f"{DIM}{s}{RESET}" if on else s


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _install_sigint(handler):
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no Ctrl-C handling, generation still works
        return None


def _restore_sigint(old) -> None:
    if old is not None:
        try:
            signal.signal(signal.SIGINT, old)
        except ValueError:
            pass


def _stdin_line() -> Optional[str]:
    """One line of piped stdin as UTF-8 (None at the end); other bytes are one KvtoolError line."""
    from ..validate import decode_text

    buf = getattr(sys.stdin, "buffer", None)
    if buf is None:  # a text stream without bytes underneath (tests, embedding)
        return sys.stdin.readline() or None
    raw = buf.readline()
    return decode_text(raw, "stdin") if raw else None


def repl(session: ChatSession, interactive: bool, prompt: str = ">>> ") -> None:
    save = _setup_readline() if interactive else None
    try:
        while True:
            try:
                if interactive:
                    line = input(_readline_prompt(prompt, session.tty))
                else:
                    line = _stdin_line()
                    if line is None:
                        break
                    line = line.rstrip("\n")
            except UnicodeDecodeError as e:
                raise KvtoolError(f"stdin: not UTF-8 text ({e.reason})") from None
            except EOFError:
                if interactive:
                    session.say("", err=False)
                break
            except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
                session.say("^C" if interactive else "", err=True)
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            try:
                session.reply(line)
            except KvtoolError as e:  # e.g. the conversation outgrew the context: say so and keep going
                session.say(f"kvtool: error: {e}" + ("; /reset starts over" if "context" in str(e) else ""),
                            err=True)
    finally:
        if save is not None:
            save()


def _readline_prompt(p: str, color: bool) -> str:
    # \001..\002 tell readline the escape codes take no width
    return f"\001{BOLD}\002{p}\001{RESET}\002" if color else p


@click.command("chat")
@click.argument("model", type=click.Path())
@click.option("--system", type=str, default=None, help="System prompt.")
@click.option("-n", "--max-tokens", type=int, default=1024, show_default=True, help="Tokens per reply at most.")
@click.option("--temp", type=float, default=0.7, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--show-think/--hide-think", default=True, show_default=True, help="Show <think> blocks (dimmed).")
@load_options
def command(model, system, max_tokens, temp, top_p, top_k, seed, show_think, n_ctx, kv_budget, n_ubatch, threads,
            cache_type, no_mixed, no_beacons, flash_attn, gpu_layers, swa_full=False):
    """Chat with a GGUF (its own chat template). Reads lines from stdin when it is not a terminal."""
    if max_tokens < 0:
        raise KvtoolError(f"--max-tokens must be >= 0, got {max_tokens}")
    from ..validate import check_sampling

    check_sampling(temp, top_p, top_k, seed=seed, max_tokens=max_tokens)  # before the model loads
    m = load_model(model, n_ctx, n_ubatch, threads, cache_type, no_mixed, flash_attn, seed, no_beacons, gpu_layers,
                   kv_budget, swa_full=swa_full)
    try:
        m.chat_prompt([{"role": "user", "content": "hi"}])  # an unknown template fails now, not after typing
        interactive = _isatty(sys.stdin)
        tty_out = _isatty(sys.stdout)
        kv = m.kv_stats()
        threads = f"{kv['n_threads']} thread" + ("" if kv["n_threads"] == 1 else "s")
        hint = " · /help for commands, Ctrl-D to quit" if interactive else ""
        click.echo(_dim(f"kvtool chat · {m.name} · n_ctx {kv['n_ctx']} · {threads} · {kv_summary(kv)}{hint}",
                        tty_out and _isatty(sys.stderr)), err=True)
        session = ChatSession(m, system, dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k),
                              show_think, tty_out)
        repl(session, interactive)
    finally:
        m.close()


if __name__ == "__main__":
    run_standalone(command, "chat")
